"""Classify SQL text for the sandbox: transaction control, savepoints, and statements
PostgreSQL refuses inside a transaction block. Pure string work, no driver, no I/O.
"""

from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass

__all__ = ["Kind", "Statement", "classify", "classify_script", "mentions_advisory_locks", "split"]


class Kind(enum.Enum):
    """What a statement means to the sandbox."""

    OTHER = "other"  #: runs as is (inside the app's transaction or a per-statement savepoint)
    BEGIN = "begin"  #: BEGIN / START TRANSACTION
    COMMIT = "commit"  #: COMMIT / END
    ROLLBACK = "rollback"  #: ROLLBACK / ABORT
    SAVEPOINT = "savepoint"  #: SAVEPOINT name
    RELEASE = "release"  #: RELEASE [SAVEPOINT] name
    ROLLBACK_TO = "rollback_to"  #: ROLLBACK [WORK|TRANSACTION] TO [SAVEPOINT] name
    SET_TRANSACTION = "set_transaction"  #: SET TRANSACTION ... (only valid first in a transaction)
    REFUSED = "refused"  #: PostgreSQL refuses it inside a transaction block


@dataclass(frozen=True, slots=True)
class Statement:
    """One classified statement.

    :ivar kind: what the sandbox must do with it.
    :ivar text: the statement's text as written (no trailing semicolon).
    :ivar command: the leading keywords that decided the kind, e.g. ``"CREATE INDEX
        CONCURRENTLY"``; used in error messages.
    :ivar name: the savepoint name (folded like PostgreSQL folds identifiers) for
        SAVEPOINT / RELEASE / ROLLBACK TO, else None.
    :ivar chain: ``AND CHAIN`` on COMMIT / ROLLBACK.
    :ivar read_only: ``READ ONLY`` (True) / ``READ WRITE`` (False) on BEGIN / START
        TRANSACTION / SET TRANSACTION, None when not given.
    :ivar ddl: the statement may change the schema (CREATE/ALTER/DROP/COMMENT...).
    """

    kind: Kind
    text: str
    command: str
    name: str | None = None
    chain: bool = False
    read_only: bool | None = None
    ddl: bool = False


# First words that can never be transaction control, refused or DDL: the hot path of
# every application query stops here after one regex match.
_PLAIN_FIRST_WORDS = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "TABLE", "MERGE", "COPY"}
    | {"SHOW", "EXPLAIN", "FETCH", "MOVE", "CLOSE", "DECLARE", "LOCK", "NOTIFY", "LISTEN"}
    | {"UNLISTEN", "EXECUTE", "DEALLOCATE", "CALL", "DO", "ANALYZE", "ANALYSE", "RESET"}
    | {"LOAD", "CHECKPOINT", "TRUNCATE"}
)
_DDL_FIRST_WORDS = frozenset({"CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE"})
_FIRST_WORD = re.compile(r"\s*([A-Za-z_]+)")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def _tokens(sql: str, limit: int = 12) -> list[str]:
    """The first *limit* tokens of *sql*, comments and whitespace skipped.

    Words come upper-cased; a quoted identifier comes as ``"name"`` with its quotes so a
    caller can tell it from a keyword; a parenthesised group comes as ``()``; a string
    literal as ``''``; any other character as itself.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n and len(out) < limit:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith(("--", "/*"), i):
            i = _skip_comment(sql, i)
        elif c == '"':
            j = i + 1
            while True:
                k = sql.find('"', j)
                if k < 0:
                    k = n
                    break
                if sql.startswith('""', k):
                    j = k + 2
                    continue
                break
            out.append(sql[i : k + 1])
            i = k + 1
        elif c == "'":
            i = _skip_string(sql, i, backslashes=False)
            out.append("''")
        elif c == "(":
            depth = 0
            while i < n:
                ch = sql[i]
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                elif ch == "'":
                    i = _skip_string(sql, i, backslashes=False)
                    continue
                elif ch == '"':
                    k = sql.find('"', i + 1)
                    i = n if k < 0 else k + 1
                    continue
                i += 1
            out.append("()")
        else:
            m = _WORD.match(sql, i)
            if m:
                out.append(m.group().upper())
                i = m.end()
            else:
                out.append(c)
                i += 1
    return out


def _skip_comment(sql: str, i: int) -> int:
    """The index after the ``--`` or ``/* */`` comment that starts at *i*."""
    if sql.startswith("--", i):
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end + 1
    return _skip_block_comment(sql, i)


def _skip_block_comment(sql: str, i: int) -> int:
    # PostgreSQL block comments nest.
    depth, n = 0, len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _skip_string(sql: str, i: int, *, backslashes: bool) -> int:
    """Index after the string literal opening at ``sql[i] == "'"``."""
    j, n = i + 1, len(sql)
    while j < n:
        c = sql[j]
        if backslashes and c == "\\":
            j += 2
            continue
        if c == "'":
            if j + 1 < n and sql[j + 1] == "'":
                j += 2
                continue
            return j + 1
        j += 1
    return n


_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def split(sql: str) -> list[str]:
    """Split a script into statements at top-level semicolons.

    Understands quotes (``'...'``, ``E'...'``, ``"..."``, ``$tag$...$tag$``), nested
    comments, parentheses, and ``BEGIN ATOMIC ... END`` bodies of SQL-standard function
    definitions (the same rule psql uses). Empty statements are dropped; text is kept
    verbatim, without the separating semicolons.
    """
    parts: list[str] = []
    start = i = 0
    n = len(sql)
    paren = 0
    atomic = 0  # BEGIN/CASE ... END depth inside CREATE FUNCTION/PROCEDURE bodies
    routine: bool | None = None  # is the current statement CREATE [OR REPLACE] FUNCTION/PROC?
    prev_word = ""
    while i < n:
        c = sql[i]
        if c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not sql[i - 2].isalnum())
            i = _skip_string(sql, i, backslashes=escapes)
        elif c == '"':
            k = sql.find('"', i + 1)
            i = n if k < 0 else k + 1
        elif c == "$":
            m = _DOLLAR_TAG.match(sql, i)
            if m and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
                k = sql.find(m.group(), m.end())
                i = n if k < 0 else k + len(m.group())
            else:
                i += 1
        elif sql.startswith(("--", "/*"), i):
            i = _skip_comment(sql, i)
        elif c == "(":
            paren += 1
            i += 1
        elif c == ")":
            paren = max(0, paren - 1)
            i += 1
        elif c == ";" and paren == 0 and atomic == 0:
            if sql[start:i].strip():
                parts.append(sql[start:i].strip())
            i += 1
            start = i
            routine = None
            prev_word = ""
        elif c.isalpha() or c == "_":
            m = _WORD.match(sql, i)
            assert m is not None
            word = m.group().upper()
            i = m.end()
            if routine is None:
                head = _tokens(sql[start:], 4)
                routine = (
                    bool(head)
                    and head[0] == "CREATE"
                    and ("FUNCTION" in head or "PROCEDURE" in head)
                )
            if routine:
                if (word == "ATOMIC" and prev_word == "BEGIN") or (word == "CASE" and atomic):
                    atomic += 1
                elif word == "END" and atomic:
                    atomic -= 1
            prev_word = word
        else:
            i += 1
    if sql[start:].strip():
        parts.append(sql[start:].strip())
    return parts


def _savepoint_name(token: str | None) -> str | None:
    if token is None or token in ("()", "''", ";"):
        return None
    if token.startswith('"'):
        return token[1:-1].replace('""', '"')
    return token.lower()


def _modes(tokens: list[str]) -> bool | None:
    for a, b in itertools.pairwise(tokens):
        if a == "READ" and b == "ONLY":
            return True
        if a == "READ" and b == "WRITE":
            return False
    return None


def _chain(tokens: list[str]) -> bool:
    return "CHAIN" in tokens and "NO" not in tokens


def _refused(t: list[str]) -> str | None:
    """The command name when PostgreSQL refuses *t* inside a transaction block."""
    first = t[0]
    second = t[1] if len(t) > 1 else ""
    if first == "VACUUM":
        return "VACUUM"
    if first in ("CREATE", "DROP"):
        if second in ("DATABASE", "TABLESPACE", "SUBSCRIPTION"):
            return f"{first} {second}"
        rest = t[1:5]
        if "INDEX" in rest and "CONCURRENTLY" in rest:
            return f"{first} INDEX CONCURRENTLY"
        return None
    if first == "ALTER":
        if second == "SYSTEM":
            return "ALTER SYSTEM"
        if second == "DATABASE" and t[3:5] == ["SET", "TABLESPACE"]:
            return "ALTER DATABASE SET TABLESPACE"
        if second == "SUBSCRIPTION" and ("REFRESH" in t or "PUBLICATION" in t):
            return "ALTER SUBSCRIPTION"
        return None
    if first == "REINDEX":
        if "CONCURRENTLY" in t[1:5]:
            return "REINDEX CONCURRENTLY"
        for target in ("SCHEMA", "DATABASE", "SYSTEM"):
            if target in t[1:3]:
                return f"REINDEX {target}"
        return None
    if first == "CLUSTER":
        rest = [w for w in t[1:] if w not in ("VERBOSE", "()", ";")]
        return "CLUSTER" if not rest else None
    if first == "DISCARD" and second == "ALL":
        return "DISCARD ALL"
    if first in ("COMMIT", "ROLLBACK") and second == "PREPARED":
        return f"{first} PREPARED"
    if first == "PREPARE" and second == "TRANSACTION":
        return "PREPARE TRANSACTION"
    return None


def classify(sql: str) -> Statement:
    """Classify one statement (for a script, use :func:`classify_script`)."""
    m = _FIRST_WORD.match(sql)
    if m is not None and m.group(1).upper() in _PLAIN_FIRST_WORDS:
        return Statement(Kind.OTHER, sql, m.group(1).upper())
    t = _tokens(sql)
    if not t:
        return Statement(Kind.OTHER, sql, "")
    first = t[0]
    second = t[1] if len(t) > 1 else ""
    refused = _refused(t)
    if refused is not None:
        return Statement(Kind.REFUSED, sql, refused)
    words = [w for w in t[1:] if w not in ("WORK", "TRANSACTION")]
    if first == "BEGIN" or (first == "START" and second == "TRANSACTION"):
        return Statement(Kind.BEGIN, sql, "BEGIN", read_only=_modes(t))
    if first in ("COMMIT", "END"):
        return Statement(Kind.COMMIT, sql, first, chain=_chain(t))
    if first in ("ROLLBACK", "ABORT"):
        if words[:1] == ["TO"]:
            name_at = 2 if words[1:2] == ["SAVEPOINT"] else 1
            name = _savepoint_name(words[name_at] if len(words) > name_at else None)
            return Statement(Kind.ROLLBACK_TO, sql, "ROLLBACK TO SAVEPOINT", name=name)
        return Statement(Kind.ROLLBACK, sql, first, chain=_chain(t))
    if first == "SAVEPOINT":
        return Statement(Kind.SAVEPOINT, sql, "SAVEPOINT", name=_savepoint_name(second or None))
    if first == "RELEASE":
        name_at = 2 if second == "SAVEPOINT" else 1
        name = _savepoint_name(t[name_at] if len(t) > name_at else None)
        return Statement(Kind.RELEASE, sql, "RELEASE SAVEPOINT", name=name)
    if first == "SET" and second == "TRANSACTION":
        return Statement(Kind.SET_TRANSACTION, sql, "SET TRANSACTION", read_only=_modes(t))
    if first == "SET" and second == "LOCAL" and len(t) > 2 and t[2].startswith("TRANSACTION_"):
        return Statement(Kind.SET_TRANSACTION, sql, "SET LOCAL " + t[2])
    return Statement(Kind.OTHER, sql, first, ddl=first in _DDL_FIRST_WORDS)


def classify_script(sql: str) -> list[Statement]:
    """Classify every statement of *sql*; one element for the common single statement.

    A script whose statements are all :attr:`Kind.OTHER` comes back as one OTHER
    statement holding the whole text, so the caller can send it in one round trip.
    """
    one = classify(sql)
    if one.kind is Kind.OTHER and one.command in _PLAIN_FIRST_WORDS and ";" not in sql:
        return [one]
    if ";" not in sql.rstrip().rstrip(";"):
        return [one]
    parts = split(sql)
    if len(parts) <= 1:
        return [classify(parts[0])] if parts else [one]
    stmts = [classify(p) for p in parts]
    if all(s.kind is Kind.OTHER for s in stmts):
        return [Statement(Kind.OTHER, sql, stmts[0].command, ddl=any(s.ddl for s in stmts))]
    return stmts


def mentions_advisory_locks(sql: str) -> bool:
    """Whether *sql* may take session-level advisory locks (names a ``pg_*advisory*``
    function). Such locks survive ROLLBACK: the sandbox frees them when it closes."""
    # Two substring checks cost a tenth of a case-insensitive regex on every statement;
    # they miss only a name cased like "pg_aDvIsOrY_lock".
    return "dvisory" in sql or "DVISORY" in sql
