"""Generate corral's blocking modules from their asyncio sources (the twins are written once).

The asyncio module is the source; its blocking twin is derived from it, as psycopg 3 does
(``tools/async_to_sync.py`` in its repository), with the standard library only:

- ``async def`` / ``async with`` / ``async for`` lose ``async``; ``await x`` becomes ``x``;
- names map to their blocking counterparts (:data:`NAMES`: ``AsyncRedisClient`` ->
  ``RedisClient``, ``aclose`` -> ``close``, ``asyncio.sleep`` -> ``time.sleep``...), in code,
  docstrings and comments alike;
- ``if ASYNC:`` blocks (``corral._twins.ASYNC``; also ``if ASYNC and ...:``) keep their
  body in the asyncio module and are replaced by their ``else:`` body (dedented; none:
  nothing) in the blocking one; ``if not ASYNC:`` the other way round. For the few places
  where the two really differ (closing redis-py's asyncio connections, a finalizer...);
- ``asyncio.shield(x)`` becomes ``x``, ``Awaitable[T]`` becomes ``T``;
- imports the blocking module no longer uses are dropped, the names of a
  ``from ... import`` are sorted again, and so are adjacent ``from`` imports by module
  (as ruff's isort would).

The output carries a header naming its source; ``tests/test_generated.py`` checks that the
committed files equal what this tool generates now, so CI catches an edit of a generated
file or a source changed without regenerating.

Usage: ``python tools/async_to_sync.py`` (writes every twin), ``--check`` (exit 1 and name
the stale files, write nothing).
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Twin:
    source: str  # the asyncio module, relative to ROOT
    target: str  # the generated blocking module
    # Phrases replaced in the blocking module's text before the names (docstrings).
    phrases: tuple[tuple[str, str], ...] = field(default=())


TWINS = (
    Twin(
        "src/corral/broker/_api_async.py",
        "src/corral/broker/_api_sync.py",
        phrases=(
            (
                ":class:`AsyncClientAPI`, the asyncio source.",
                ":class:`ClientAPI`, the blocking twin.",
            ),
            (" is generated from\n``_api_async.py``", " is generated from\nits asyncio source"),
            (" (an async *compute* is awaited)", ""),
        ),
    ),
    Twin(
        "src/corral/broker/redis/_async.py",
        "src/corral/broker/redis/_sync.py",
        phrases=(
            ("The asyncio Redis client", "The blocking Redis client"),
            ("An asyncio client of", "A blocking client of"),
            ("API, awaitable.", "API."),
            ("A heartbeat task keeps", "A heartbeat thread keeps"),
            (
                "``once`` accepts an async *compute*; ``lock`` and\n    ``acquire`` are "
                "``async with``; the heartbeat is a task on the loop of first use: use\n"
                "    one client per event loop.",
                "Thread-safe (one session per process,\n    shared by its threads) and "
                "fork-aware (a child gets its own session).",
            ),
        ),
    ),
    Twin(
        "src/corral/sandbox/_psycopg_async_conn.py",
        "src/corral/sandbox/_psycopg_sync_conn.py",
        phrases=(
            ("The psycopg 3 asyncio proxies", "The psycopg 3 blocking proxies"),
            (
                " (the\nblocking twin, :mod:`._psycopg_sync_conn`, is generated from this module)",
                "",
            ),
            ("A psycopg async cursor", "A psycopg cursor"),
        ),
    ),
    Twin(
        "src/corral/sandbox/_psycopg_async.py",
        "src/corral/sandbox/_psycopg_sync.py",
        phrases=(
            (
                "The psycopg 3 adapter, asyncio: ``AsyncConnectionPool`` and async connection "
                "factories.",
                "The psycopg 3 adapter, synchronous: ``ConnectionPool`` and connection factories.",
            ),
            ("\nThe blocking twin, :mod:`._psycopg_sync`, is generated from this module.", ""),
            ("a psycopg async connection", "a psycopg connection"),
            ("the async pool and factory adapters", "the pool and the factory adapters"),
            ('"psycopg async"', '"psycopg"'),
            (
                "A sandboxed async connection factory: ``await db.connect()`` replaces\n"
                "    ``await psycopg.AsyncConnection.connect()``.",
                "A sandboxed connection factory: ``db.connect()`` replaces ``psycopg.connect()``.",
            ),
            (
                "a coroutine function returning a new\n        ``psycopg.AsyncConnection``.",
                "a callable returning a new\n        ``psycopg.Connection`` "
                "(e.g. ``functools.partial(psycopg.connect, dsn)``).",
            ),
        ),
    ),
)

# Async name -> blocking name, as whole words (attributes and prose included).
NAMES = {
    "_api_async": "_api_sync",
    "AsyncClosing": "Closing",
    "AsyncClientAPI": "ClientAPI",
    "AsyncOnceAPI": "OnceAPI",
    "AsyncRedisClient": "RedisClient",
    "AsyncSession": "SyncSession",
    "AsyncClient": "Client",
    "AsyncIterator": "Iterator",
    "AsyncBoxController": "BoxController",
    "AsyncConnectSandbox": "ConnectSandbox",
    "AsyncPoolSandbox": "PoolSandbox",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncSandboxConnection": "SandboxConnection",
    "AsyncSandboxCursor": "SandboxCursor",
    "AsyncSandboxTransaction": "SandboxTransaction",
    "AsyncOwnerLock": "OwnerLock",
    "AsyncConnection": "Connection",
    "AsyncCursor": "Cursor",
    "_psycopg_async": "_psycopg_sync",
    "_psycopg_async_conn": "_psycopg_sync_conn",
    "AbstractAsyncContextManager": "AbstractContextManager",
    "asynccontextmanager": "contextmanager",
    "aclose": "close",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
}
# Dotted names -> blocking names (code only).
DOTTED = {"asyncio.sleep": "time.sleep", "redis.asyncio": "redis", "redis_py.asyncio": "redis_py"}
# Calls that only matter on asyncio: ``asyncio.shield(x)`` is ``x`` in the blocking twin.
UNWRAP = {"asyncio.shield"}
# Phrases of prose (docstrings, comments) common to every twin.
PROSE = (("``async with", "``with"), ("async with", "with"), ("an async *compute*", "*compute*"))

HEADER = (
    "# Generated by tools/async_to_sync.py from {source}: do not edit.\n"
    "# Edit the asyncio source, then run `python tools/async_to_sync.py`.\n"
)
_WORD = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b")


def generate(twin: Twin) -> str:
    """The blocking module for *twin*, from its source as it is on disk now."""
    text = (ROOT / twin.source).read_text()
    text = _choose_branches(text)
    text = _rewrite_tokens(text, twin.phrases)
    text = _tidy_imports(text)
    return HEADER.format(source=twin.source) + text


def _choose_branches(text: str) -> str:
    """Replace each ``if ASYNC:`` by its ``else:`` body and each ``if not ASYNC:`` by its
    body, dedented."""
    lines = text.splitlines(keepends=True)
    blocks = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.If):
            continue
        test = node.test
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            test = test.values[0]  # `if ASYNC and ...:` is as false as `if ASYNC:`
        if isinstance(test, ast.Name) and test.id == "ASYNC":
            blocks.append((node, node.orelse))
        elif (
            isinstance(node.test, ast.UnaryOp)
            and isinstance(node.test.op, ast.Not)
            and isinstance(node.test.operand, ast.Name)
            and node.test.operand.id == "ASYNC"
        ):
            if node.orelse:
                raise ValueError(f"line {node.lineno}: `if not ASYNC:` takes no else branch")
            blocks.append((node, node.body))
    for node, kept in sorted(blocks, key=lambda block: block[0].lineno, reverse=True):
        start, end = node.lineno - 1, node.end_lineno or node.lineno
        indent = len(lines[start]) - len(lines[start].lstrip())
        replacement: list[str] = []
        if kept:
            first = kept[0].lineno - 1
            while lines[first - 1].strip() not in ("else:", lines[start].strip()):
                first -= 1  # comments (and decorators) before the branch's first statement
            while not lines[first].strip():
                first += 1  # the blank line ruff puts before a decorated def opening a block
            step = len(lines[first]) - len(lines[first].lstrip()) - indent
            replacement = [line[step:] if line.strip() else line for line in lines[first:end]]
        if not replacement and not lines[start - 1].strip() and not lines[end].strip():
            end += 1  # a block between two blank lines leaves one
        lines[start:end] = replacement
    return "".join(lines)


def _rewrite_tokens(text: str, phrases: tuple[tuple[str, str], ...]) -> str:
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def at(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    tokens = [
        tok
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    ]
    edits: list[tuple[int, int, str]] = []
    skip = 0
    for i, tok in enumerate(tokens):
        if skip:
            skip -= 1
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.type == tokenize.NAME:
            if nxt is not None and (
                tok.string == "await"
                or (tok.string == "async" and nxt.string in ("def", "with", "for"))
            ):
                edits.append((at(tok.start), at(nxt.start), ""))
            elif (dotted := _dotted(tokens, i)) in DOTTED:
                edits.append((at(tok.start), at(tokens[i + 2].end), DOTTED[dotted]))
                skip = 2
            elif dotted in UNWRAP and tokens[i + 3].string == "(":
                close = _closing(tokens, i + 3)
                edits.append((at(tok.start), at(tokens[i + 3].end), ""))
                edits.append((at(tokens[close].start), at(tokens[close].end), ""))
                skip = 3
            elif tok.string == "Awaitable" and nxt is not None and nxt.string == "[":
                close = _closing(tokens, i + 1)
                edits.append((at(tok.start), at(nxt.end), ""))
                edits.append((at(tokens[close].start), at(tokens[close].end), ""))
                skip = 1
            elif tok.string in NAMES:
                edits.append((at(tok.start), at(tok.end), NAMES[tok.string]))
        elif tok.type in (tokenize.STRING, tokenize.COMMENT):
            prose = tok.string
            for old, new in (*phrases, *PROSE):
                prose = prose.replace(old, new)
            prose = _WORD.sub(lambda m: NAMES[m.group(1)], prose)
            if prose != tok.string:
                edits.append((at(tok.start), at(tok.end), prose))
    for begin, end, new in sorted(edits, reverse=True):
        text = text[:begin] + new + text[end:]
    return text


def _dotted(tokens: list[tokenize.TokenInfo], index: int) -> str | None:
    """``a.b`` when the name at *index* is followed by ``.b``."""
    if index + 2 < len(tokens) and tokens[index + 1].string == ".":
        return f"{tokens[index].string}.{tokens[index + 2].string}"
    return None


def _closing(tokens: list[tokenize.TokenInfo], opening: int) -> int:
    """The index of the token that closes the bracket at *opening*."""
    depth = 0
    for index in range(opening, len(tokens)):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(tokens[index].string, 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced bracket at line {tokens[opening].start[0]}")


def _sort_key(name: str) -> tuple[int, str]:
    # ruff's isort order within one import: CONSTANTS, Classes, then the rest.
    bare = name.split(" as ")[0]
    kind = 0 if bare.isupper() and len(bare) > 1 else 1 if bare[:1].isupper() else 2
    return kind, bare


def _tidy_imports(text: str) -> str:
    """Drop imported names the module no longer uses; sort a ``from`` import's names."""
    tree = ast.parse(text)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    exported = re.search(r"__all__ = \[(.*?)\]", text, re.S)
    if exported:
        used |= set(re.findall(r'"(\w+)"', exported.group(1)))
    lines = text.splitlines(keepends=True)
    imports = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
    ]
    for node in sorted(imports, key=lambda n: n.lineno, reverse=True):
        keep = [
            alias
            for alias in node.names
            if (alias.asname or alias.name).split(".")[0] in used or alias.name == "*"
        ]
        start, end = node.lineno - 1, node.end_lineno or node.lineno
        indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
        if not keep:
            lines[start:end] = []
            continue
        names = sorted(  # a set: two async names can map to one (AsyncIterator, Iterator)
            {f"{a.name} as {a.asname}" if a.asname else a.name for a in keep}, key=_sort_key
        )
        if isinstance(node, ast.Import):
            new = [f"{indent}import {name}\n" for name in names]
        elif end - start == 1:
            new = [f"{indent}from {node.module} import {', '.join(names)}\n"]
        else:
            body = "".join(f"{indent}    {name},\n" for name in names)
            new = [f"{indent}from {node.module} import (\n", body, f"{indent})\n"]
        lines[start:end] = new
    return _sort_from_imports("".join(lines))


def _sort_from_imports(text: str) -> str:
    """Sort each run of adjacent top-level ``from`` imports by module (as ruff's isort does):
    a renamed module (``_psycopg_async_conn`` -> ``_psycopg_sync_conn``) moves to its place."""
    lines = text.splitlines(keepends=True)
    runs: list[list[ast.ImportFrom]] = []
    previous = None
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if previous is not None and node.lineno == (previous.end_lineno or 0) + 1:
                runs[-1].append(node)
            else:
                runs.append([node])
            previous = node
        else:
            previous = None
    for run in reversed(runs):
        start, end = run[0].lineno - 1, run[-1].end_lineno or run[-1].lineno
        chunks = sorted(run, key=lambda node: (node.level, (node.module or "").lower()))
        lines[start:end] = [
            line for node in chunks for line in lines[node.lineno - 1 : node.end_lineno]
        ]
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on a stale file; write none")
    args = parser.parse_args(argv)
    stale = []
    for twin in TWINS:
        wanted = generate(twin)
        path = ROOT / twin.target
        if path.exists() and path.read_text() == wanted:
            continue
        stale.append(twin.target)
        if not args.check:
            path.write_text(wanted)
    if args.check and stale:
        print(
            f"stale generated files: {', '.join(stale)}; run `python tools/async_to_sync.py`",
            file=sys.stderr,
        )
        return 1
    for target in stale:
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
