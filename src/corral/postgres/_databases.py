"""Clone, drop and clean up databases; corral's marks on the databases it creates.

Every database corral creates carries ``COMMENT ON DATABASE`` with a JSON mark
(``{"corral": "clone"|"template", "host", "pid", "pid_start", "run", ...}``). Clean-up only
ever touches databases with such a mark, so a user's own databases are safe.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

from corral.errors import DatabaseInUse, PostgresError
from corral.postgres._admin import (
    DUPLICATE_DATABASE,
    INVALID_CATALOG_NAME,
    OBJECT_IN_USE,
    AdminConnection,
    AdminError,
    admin,
    quote_ident,
    quote_literal,
)
from corral.postgres._procs import is_alive, process_start_time

log = logging.getLogger("corral.postgres")

CLONE_PREFIX = "corral_db_"


@dataclass(frozen=True)
class CorralDatabase:
    """A database corral created, as read back from its mark.

    :ivar kind: ``"clone"`` or ``"template"``.
    :ivar state: for templates, ``"building"`` or ``"ready"``.
    """

    name: str
    kind: str
    host: str
    pid: int
    pid_start: str | None
    run: str | None
    created: float
    state: str | None
    is_template: bool
    template: str | None

    def owner_alive(self) -> bool | None:
        """Whether the creating process still runs; ``None`` when it ran on another host."""
        if self.host != socket.gethostname():
            return None
        return is_alive(self.pid, self.pid_start)


def make_mark(kind: str, *, owner_pid: int | None = None, **extra: Any) -> str:
    pid = owner_pid or os.getpid()
    mark = {
        "corral": kind,
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": process_start_time(pid),
        "run": os.environ.get("CORRAL_RUN_ID") or None,
        "created": time.time(),
    }
    mark.update(extra)
    return json.dumps(mark, sort_keys=True)


def set_mark(conn: AdminConnection, name: str, mark: str) -> None:
    conn.execute(f"COMMENT ON DATABASE {quote_ident(name)} IS {quote_literal(mark)}")


def parse_mark(name: str, comment: str | None, is_template: bool) -> CorralDatabase | None:
    if not comment or not comment.startswith("{"):
        return None
    try:
        mark = json.loads(comment)
        return CorralDatabase(
            name=name,
            kind=str(mark["corral"]),
            host=str(mark.get("host", "")),
            pid=int(mark.get("pid", 0)),
            pid_start=mark.get("pid_start"),
            run=mark.get("run"),
            created=float(mark.get("created", 0.0)),
            state=mark.get("state"),
            is_template=is_template,
            template=mark.get("template"),
        )
    except (ValueError, KeyError, TypeError):
        return None


# How long _end_sessions() polls for ended sessions to go, and how often.
_END_WAIT = 2.0
_END_POLL = 0.0005
_END_POLL_MAX = 0.01


def template_ready(conn: AdminConnection, name: str) -> bool | None:
    """Whether database *name* is a finished template (None: no such database; False: a
    build that has not finished, or whose process died)."""
    rows = conn.execute(
        "SELECT datistemplate, shobj_description(oid, 'pg_database')"
        " FROM pg_database WHERE datname = %s",
        [name],
    )
    if not rows:
        return None
    is_template, comment = rows[0]
    mark = parse_mark(name, comment, is_template)
    return bool(is_template) and (mark is None or mark.state == "ready")


def list_databases(admin_dsn: str) -> list[CorralDatabase]:
    """Every database on the server that carries corral's mark."""
    with admin(admin_dsn) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database'), datistemplate"
            " FROM pg_database ORDER BY datname"
        )
    found = (parse_mark(name, comment, is_tpl) for name, comment, is_tpl in rows)
    return [db for db in found if db is not None]


def controller_clones(admin_dsn: str, run_id: str, controller_pid: int) -> list[CorralDatabase]:
    """The clones one controller of run *run_id* made on the server: only these are its
    to drop (other machines of a sharded run share the run id and the server)."""
    return [
        db
        for db in list_databases(admin_dsn)
        if db.kind == "clone" and db.run == run_id and db.pid == controller_pid
    ]


def _terminate_sessions(conn: AdminConnection, name: str) -> int:
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        [name],
    )
    return len(rows)


def _end_sessions(conn: AdminConnection, name: str, wait: float = _END_WAIT) -> int:
    """End *name*'s sessions and wait (up to *wait* seconds) until their backends are gone.

    ``DROP DATABASE ... WITH (FORCE)`` and ``CREATE DATABASE ... TEMPLATE`` end or refuse
    such sessions themselves, but then PostgreSQL re-checks in steps of 100 ms
    (``CountOtherDBBackends``): a drop of a database that a pool still holds took 110 ms
    instead of 10. Polling from every half millisecond (backing off to 10 ms) sees a
    backend exit in ~1 ms.
    Returns how many sessions it ended.
    """
    deadline = time.monotonic() + wait
    ended = 0
    delay = _END_POLL
    while True:
        found = _terminate_sessions(conn, name)
        if not found:
            return ended
        ended = max(ended, found)
        if time.monotonic() >= deadline:
            return ended  # the statement's own waiting (and _retry_in_use) takes over
        time.sleep(delay)
        delay = min(delay * 2, _END_POLL_MAX)  # a pool that keeps reconnecting: back off


def _retry_in_use(
    conn: AdminConnection, name: str, statement: str, timeout: float, what: str
) -> None:
    """Run *statement*, ending *name*'s sessions and retrying while it is in use."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            conn.execute(statement)
            return
        except AdminError as exc:
            if exc.sqlstate != OBJECT_IN_USE:
                raise
            # Either live sessions, or backends that disconnected and are still exiting:
            # PostgreSQL counts those too for a few milliseconds.
            if time.monotonic() >= deadline:
                raise DatabaseInUse(
                    f"cannot {what}: database {name!r} stayed in use by other sessions for "
                    f"{timeout:g} s ({exc}); close the connections to it",
                    database=name,
                ) from exc
            ended = _terminate_sessions(conn, name)
            log.debug("%s: %s in use, ended %d sessions; retrying", what, name, ended)
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def clone_database(
    admin_dsn: str,
    template: str,
    name: str | None = None,
    *,
    owner_pid: int | None = None,
    run_id: str | None = None,
    timeout: float = 30.0,
) -> str:
    """Create a database from *template*; returns its name.

    Uses ``STRATEGY FILE_COPY`` on PostgreSQL 15+ (a file copy plus a checkpoint, much
    cheaper than WAL-logging every block for small schemas); older servers always copy
    files. Sessions still connected to the template are ended and the clone retried.

    :param admin_dsn: a superuser (or CREATEDB) DSN of the server.
    :param template: the template database's name (e.g. from :func:`ensure_template`).
    :param name: the new database's name (default: ``corral_db_`` + random hex).
    :param owner_pid: the process the clone belongs to for stale clean-up (default: this
        one; pass a longer-lived process's pid when the clone is handed on).
    :param run_id: recorded in the mark (default: ``CORRAL_RUN_ID``).
    :param timeout: seconds to keep retrying while the template is in use.
    :raises DatabaseInUse: the template stayed in use for *timeout* seconds.
    :raises PostgresError: the template does not exist, or *name* is taken.
    """
    name = name or CLONE_PREFIX + secrets.token_hex(6)
    extra: dict[str, Any] = {"template": template}
    if run_id is not None:
        extra["run"] = run_id
    mark = make_mark("clone", owner_pid=owner_pid, **extra)
    with admin(admin_dsn) as conn:
        strategy = " STRATEGY FILE_COPY" if conn.server_version >= 150000 else ""
        statement = f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(template)}"
        statement += strategy
        # PostgreSQL waits 5 s for sessions on the template before it gives up; end them
        # first. Templates from ensure_template() refuse connections, so this is rare.
        ended = _end_sessions(conn, template)
        if ended:
            log.warning("ended %d session(s) on template %s to clone it", ended, template)
        try:
            _retry_in_use(conn, template, statement, timeout, f"clone {template!r}")
        except AdminError as exc:
            if exc.sqlstate == INVALID_CATALOG_NAME:
                raise PostgresError(
                    f"cannot clone {template!r}: no such database; build it with ensure_template()"
                ) from exc.__cause__
            if exc.sqlstate != DUPLICATE_DATABASE:
                raise
            raise PostgresError(
                f"cannot clone {template!r} into {name!r}: a database of that name exists; "
                "drop it or let clone_database() pick a name"
            ) from exc.__cause__
        try:
            set_mark(conn, name, mark)
        except BaseException:
            conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)}")
            raise
    return name


def drop_database(admin_dsn: str, name: str, *, timeout: float = 30.0) -> bool:
    """Drop *name* if it exists, ending its sessions first; returns whether it existed.

    ``WITH (FORCE)`` on PostgreSQL 13+; before that, sessions are ended and the drop retried
    while backends that just disconnected are still exiting. A template is unmarked first.

    :raises DatabaseInUse: sessions kept reconnecting for *timeout* seconds.
    """
    with admin(admin_dsn) as conn:
        rows = conn.execute("SELECT datistemplate FROM pg_database WHERE datname = %s", [name])
        if not rows:
            return False
        if rows[0][0]:
            conn.execute(f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE false")
        _end_sessions(conn, name)  # FORCE would too, but then wait 100 ms for them to go
        force = " WITH (FORCE)" if conn.server_version >= 130000 else ""
        statement = f"DROP DATABASE IF EXISTS {quote_ident(name)}{force}"
        _retry_in_use(conn, name, statement, timeout, f"drop {name!r}")
    return True


def drop_stale_databases(
    admin_dsn: str,
    *,
    run_id: str | None = None,
    older_than: float | None = None,
    include_templates: bool = False,
) -> list[str]:
    """Drop databases corral created whose creator is gone; returns the names dropped.

    A database counts as stale when it carries corral's mark and: its creator process on
    this host is dead; or it belongs to *run_id* (that run is over); or it is older than
    *older_than* seconds (for creators on other hosts, whose liveness cannot be checked).
    Ready templates are kept (they are reused across runs) unless *include_templates*.
    Databases without corral's mark are never touched.
    """
    dropped: list[str] = []
    now = time.time()
    for db in list_databases(admin_dsn):
        ready_template = db.kind == "template" and db.state == "ready"
        if ready_template and not include_templates:
            continue
        alive = db.owner_alive()
        stale = (
            alive is False
            or (run_id is not None and db.run == run_id)
            or (older_than is not None and now - db.created > older_than)
            or (include_templates and ready_template)
        )
        if not stale:
            continue
        try:
            if drop_database(admin_dsn, db.name):
                dropped.append(db.name)
                log.info("dropped stale database %s (%s of pid %d)", db.name, db.kind, db.pid)
        except PostgresError as exc:
            log.warning("could not drop stale database %s: %s", db.name, exc)
    return dropped
