"""``EphemeralPostgres``: a throwaway PostgreSQL server for one process, tuned for tests.

Start = find binaries, clean up dead owners' clusters, copy the cached initdb result into a
private run directory, launch ``postgres`` directly (no ``pg_ctl``: it polls at 10 Hz) and
wait for ``postmaster.pid`` to say ``ready``. A watchdog process stops it if we die. With
``tcp=True`` it also listens on 127.0.0.1, where the superuser needs a per-start password.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from corral._lifecycle import Running
from corral.errors import PostgresStartError
from corral.postgres import _cache, _runtime
from corral.postgres._binaries import PostgresBinaries, find_binaries
from corral.postgres._osuser import ServerUser, resolve_server_user
from corral.postgres._procs import process_start_time

log = logging.getLogger("corral.postgres")

#: settings for a test server: durability off (the data is thrown away), no background noise.
TEST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_connections": "200",
    "autovacuum": "off",
    "jit": "off",
    "log_checkpoints": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}

_LOG_TAIL_LINES = 40
#: Launches with a freshly picked TCP port: another process may take the port between the
#: pick and the server's bind (two servers started side by side), which is retried.
_PORT_ATTEMPTS = 8
#: The socket directory is private (0700), so it may trust; 127.0.0.1 is reachable by every
#: local user, so TCP asks for the superuser's password (SCRAM; never trust).
_HBA = """\
# corral: the Unix socket lies in a private directory; TCP asks for the password.
local all all trust
host all all 127.0.0.1/32 scram-sha-256
"""
#: Key stretching (PostgreSQL's default: 4096 rounds, paid by the client at every connect,
#: ~10 ms here) protects guessable passwords; a random 192-bit one needs none.
_SCRAM_ITERATIONS = 1
#: sun_path is 108 bytes on Linux (104 on macOS), including the terminating NUL.
_MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


class EphemeralPostgres(Running):
    """A throwaway PostgreSQL cluster: private Unix socket, no durability, gone after stop.

    ::

        with EphemeralPostgres() as pg:
            psycopg.connect(pg.dsn)

    :param bindir: PostgreSQL's ``bin`` directory (default: found, see :func:`find_binaries`).
    :param version: required major version (default: ``CORRAL_PG_VERSION``, else newest).
    :param port: the port number; it names the Unix socket and, with *tcp*, the TCP port
        (default: 5432 for socket-only servers, a free port with *tcp*).
    :param tcp: also listen on ``127.0.0.1``, where connections need the superuser's
        password (:attr:`tcp_dsn` carries it); URL parsers that want a host and a port
        (pydantic's ``PostgresDsn``) accept :attr:`tcp_dsn` and :attr:`url`, not :attr:`dsn`.
    :param password: the superuser's password over TCP (default: a random one per start).
    :param settings: server settings merged over :data:`TEST_SETTINGS`; a ``None`` value
        drops a default.
    :param initdb_args: extra ``initdb`` arguments (part of the cache key).
    :param user: as root, the OS user to run the server as (default: ``CORRAL_PG_USER``,
        else ``postgres``, else a ``corral-postgres`` system user created on first use).
    :param runtime_dir: where run directories go (default: ``CORRAL_PG_RUNTIME_DIR``, else
        ``/dev/shm/corral-pg-UID``, else the temp directory).
    :param cache_dir: the initdb cache (default: ``CORRAL_PG_CACHE_DIR``, else
        ``~/.cache/corral/postgres``).
    :param use_cache: ``False`` runs initdb every time.
    :param log_path: keep the server log at this path (default: inside the run directory,
        removed by :meth:`stop`).
    :param start_timeout: seconds to wait for the server to accept connections.
    :param watchdog: stop the server when this process dies (recommended).
    :param seed: start from a copy of this data directory (one :meth:`stop_keeping` kept,
        of the same installation) instead of a fresh cluster; the caller checks it fits.
    """

    #: the settings every server starts with (see ``settings`` to change them).
    DEFAULT_SETTINGS: Mapping[str, str] = TEST_SETTINGS

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        version: int | None = None,
        port: int | None = None,
        tcp: bool = False,
        password: str | None = None,
        settings: Mapping[str, str | int | None] | None = None,
        initdb_args: Sequence[str] = (),
        user: str | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        watchdog: bool = True,
        seed: str | os.PathLike[str] | None = None,
    ) -> None:
        self._seed = Path(seed) if seed is not None else None
        self._bindir_arg = bindir
        self._version_arg = version
        self._port_arg = port
        self.tcp = tcp
        self._password_arg = password
        self._password = ""
        self._settings = dict(settings or {})
        self._initdb_args = tuple(initdb_args)
        self._user_arg = user
        self._runtime_arg = Path(runtime_dir) if runtime_dir is not None else None
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._use_cache = use_cache
        self._log_arg = Path(log_path) if log_path is not None else None
        self.start_timeout = start_timeout
        self._use_watchdog = watchdog

        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._run_dir: Path | None = None
        self._log_path: Path | None = None
        self._binaries: PostgresBinaries | None = None
        self._server_user: ServerUser | None = None
        self._port = 0
        self._owner_pid = 0
        #: whether the last start copied a cached initdb (``False``: ran initdb).
        self.cache_hit: bool | None = None
        #: seconds the last start took.
        self.start_seconds: float | None = None

    # ------------------------------------------------------------------ properties

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _require(self) -> Path:
        if self._run_dir is None or self._process is None:
            raise PostgresStartError("the server is not running: call start() first")
        return self._run_dir

    @property
    def dsn(self) -> str:
        """Superuser DSN (libpq URL) over the Unix socket: ``postgresql://postgres@/postgres?...``."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str, *, user: str = "postgres") -> str:
        """A libpq URL for *database* on this server over the Unix socket."""
        host = quote(str(self._require()), safe="/")
        return f"postgresql://{quote(user)}@/{quote(database)}?host={host}&port={self._port}"

    @property
    def tcp_dsn(self) -> str:
        """Superuser DSN over TCP: ``postgresql://postgres:PASSWORD@127.0.0.1:PORT/postgres``
        (only with ``tcp=True``)."""
        return self.tcp_dsn_for("postgres")

    def tcp_dsn_for(self, database: str) -> str:
        """The superuser's libpq URL for *database* over TCP (only with ``tcp=True``)."""
        self._require()
        if not self.tcp:
            raise PostgresStartError("this server listens on a Unix socket only; pass tcp=True")
        login = f"postgres:{quote(self._password, safe='')}"
        return f"postgresql://{login}@127.0.0.1:{self._port}/{quote(database, safe='')}"

    @property
    def url(self) -> str:
        """The superuser's URL that readers take either way (only with ``tcp=True``):
        ``postgresql://postgres:PASSWORD@127.0.0.1:PORT/postgres?host=SOCKET_DIR``."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """*database*'s URL with a host and a port for URL parsers (pydantic's
        ``PostgresDsn``, dj-database-url, SQLAlchemy's ``make_url``) and the socket directory
        in the query, which libpq (psycopg) and SQLAlchemy's connect arguments (its asyncpg
        dialect too) prefer over the URL's host: they use the faster Unix socket; readers
        that keep the URL's host (asyncpg itself, Django) connect over TCP with the
        password. Only with ``tcp=True``."""
        host = quote(str(self._require()), safe="/")
        return f"{self.tcp_dsn_for(database)}?host={host}"

    @property
    def password(self) -> str:
        """The superuser's password over TCP ('' without ``tcp=True``)."""
        self._require()
        return self._password

    @property
    def host(self) -> str:
        """The Unix socket directory (libpq's ``host``)."""
        return str(self._require())

    @property
    def port(self) -> int:
        self._require()
        return self._port

    @property
    def data_dir(self) -> Path:
        return self._require() / "data"

    @property
    def log_path(self) -> Path:
        self._require()
        assert self._log_path is not None
        return self._log_path

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        self._require()
        assert self._process is not None
        return self._process.pid

    @property
    def binaries(self) -> PostgresBinaries:
        if self._binaries is None:
            self._binaries = find_binaries(self._bindir_arg, version=self._version_arg)
        return self._binaries

    @property
    def bindir(self) -> Path:
        return self.binaries.bindir

    @property
    def version(self) -> tuple[int, ...]:
        return self.binaries.version

    @property
    def server_user(self) -> ServerUser:
        if self._server_user is None:
            self._server_user = resolve_server_user(self._user_arg)
        return self._server_user

    def log_text(self) -> str:
        """The server log so far ('' when there is none)."""
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        state = f"running at {self._run_dir}" if self.running else "stopped"
        return f"<EphemeralPostgres {state}>"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EphemeralPostgres:
        """Start the server; returns ``self``.

        :raises PostgresNotFound: no PostgreSQL binaries (the message says what to install).
        :raises PostgresStartError: initdb or the server failed; carries the log.
        """
        if self.running:
            return self
        started = time.perf_counter()
        user = self.server_user
        runtime = _runtime.prepare_runtime_dir(
            self._runtime_arg or _runtime.default_runtime_dir(), user
        )
        _runtime.cleanup_stale_clusters(runtime)
        binaries = _runtime.reachable_binaries(self.binaries, user, runtime)
        self._owner_pid = os.getpid()
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=runtime))
        self._run_dir = run_dir
        try:
            self._start_in(run_dir, binaries, user)
        except BaseException:
            self._teardown()
            raise
        self.start_seconds = time.perf_counter() - started
        atexit.register(self._atexit)
        log.info(
            "PostgreSQL %s started in %.3f s (%s cache) at %s",
            ".".join(map(str, binaries.version)),
            self.start_seconds,
            "warm" if self.cache_hit else "cold",
            run_dir,
        )
        return self

    def _start_in(self, run_dir: Path, binaries: PostgresBinaries, user: ServerUser) -> None:
        socket_path = f"{run_dir}/.s.PGSQL.{self._port_arg or 65535}.lock"
        if len(socket_path.encode()) > _MAX_SOCKET_PATH:
            raise PostgresStartError(
                f"the run directory {run_dir} is too deep for a Unix socket path "
                f"({_MAX_SOCKET_PATH} bytes at most); set CORRAL_PG_RUNTIME_DIR to a shorter path"
            )
        owner = {
            "pid": self._owner_pid,
            "pid_start": process_start_time(self._owner_pid),
            "host": socket.gethostname(),
            "created": time.time(),
        }
        _runtime.write_owner(run_dir, **owner)
        user.chown(run_dir)
        if self._seed is not None:
            _cache.copy_tree(self._seed, run_dir / "data", user)
            self.cache_hit = True
        else:
            self.cache_hit = _cache.materialize(
                binaries,
                user,
                run_dir / "data",
                extra_args=self._initdb_args,
                cache_dir=self._cache_dir,
                use_cache=self._use_cache,
                identity=self.binaries,
            )
        self._log_path = self._log_arg or run_dir / "postgres.log"
        if self.tcp:
            hba = run_dir / "pg_hba.conf"
            hba.write_text(_HBA)
            user.chown(hba)
        attempts = _PORT_ATTEMPTS if self.tcp and self._port_arg is None else 1
        for attempt in range(attempts):
            self._port = self._port_arg or (_free_port() if self.tcp else 5432)
            logged = len(self.log_text())  # a kept log may hold older runs' lines
            self._launch(run_dir, binaries, user)
            _runtime.write_owner(run_dir, **owner, postmaster_pid=self.pid)
            self._start_watchdog(run_dir)
            try:
                self._wait_ready(run_dir)
                break
            except PostgresStartError as exc:
                retry = attempt + 1 < attempts and _lost_port(exc.log[logged:])
                self._stop_processes()
                if not retry:
                    raise
                log.info("port %d was taken before the server bound it; trying another", self._port)
        if self.tcp:
            self._set_password()

    def _set_password(self) -> None:
        """Give the superuser its TCP password, over the (trusted, private) socket.

        Until this runs, TCP logins fail (no password is set): nobody gets in early.
        """
        from corral.postgres._admin import admin, quote_literal

        password = self._password_arg or secrets.token_urlsafe(24)
        # A pre-hashed verifier: the password never appears in a statement (or a log), and
        # PostgreSQL 10-13, whose default is md5, store what scram-sha-256 in pg_hba needs.
        # SASLprep leaves ASCII alone; other passwords are hashed by the server.
        stored = scram_verifier(password) if password.isascii() else password
        with admin(self.dsn) as conn:  # psycopg, else asyncpg
            if stored is password:
                conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"ALTER ROLE postgres PASSWORD {quote_literal(stored)}")
        self._password = password

    def _argv(self, run_dir: Path, binaries: PostgresBinaries) -> list[str]:
        settings: dict[str, str | int | None] = dict(TEST_SETTINGS)
        settings.update(
            listen_addresses="127.0.0.1" if self.tcp else "",
            unix_socket_directories=str(run_dir),
            port=self._port,
        )
        if self.tcp:
            settings["hba_file"] = str(run_dir / "pg_hba.conf")
        settings.update(self._settings)
        argv = [str(binaries.postgres), "-D", str(run_dir / "data")]
        for name, value in settings.items():
            if value is not None:
                argv += ["-c", f"{name}={value}"]
        return argv

    def _launch(self, run_dir: Path, binaries: PostgresBinaries, user: ServerUser) -> None:
        assert self._log_path is not None
        with open(self._log_path, "ab") as log_file:
            # Own session: a Ctrl-C meant for the test run must not shut the server down under
            # the run's clean-up; stop() and the watchdog decide when it goes.
            self._process = subprocess.Popen(
                self._argv(run_dir, binaries),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_cache.server_env(),
                start_new_session=True,
                **user.popen_kwargs(),
            )

    def _start_watchdog(self, run_dir: Path) -> None:
        if not self._use_watchdog or self._process is None:
            return
        script = Path(__file__).with_name("_watchdog.py")
        self._watchdog = subprocess.Popen(
            [
                _interpreter(), "-I", "-S", str(script), str(self._owner_pid),
                process_start_time(self._owner_pid) or "-", str(self._process.pid), str(run_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )  # fmt: skip

    def _wait_ready(self, run_dir: Path) -> None:
        assert self._process is not None
        pid_file = run_dir / "data" / "postmaster.pid"
        deadline = time.monotonic() + self.start_timeout
        delay = 0.001
        while True:
            code = self._process.poll()
            if code is not None:
                self._fail(f"the server exited with code {code} during start-up")
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                lines = []
            # Line 8 of postmaster.pid is the postmaster's status (PostgreSQL 10+).
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return
            if time.monotonic() > deadline:
                self._fail(f"the server did not become ready within {self.start_timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    def _fail(self, what: str) -> None:
        text = self.log_text()
        tail = "\n".join(text.splitlines()[-_LOG_TAIL_LINES:]) or "(the log is empty)"
        kept = self._log_arg is not None
        where = f"; full log: {self._log_path}" if kept else ""
        raise PostgresStartError(
            f"{what} ({self.binaries.postgres}){where}. Last lines of its log:\n{tail}",
            log=text,
            log_path=str(self._log_path) if kept else None,
        )

    def stop(self) -> None:
        """Stop the server and remove its directory. Idempotent; safe after a failed start."""
        if self._owner_pid and self._owner_pid != os.getpid():
            # A forked child inherited this object: the server belongs to the parent.
            return
        self._teardown()

    def stop_keeping(self, target: Path) -> bool:
        """Stop the server (a clean shutdown), keep a copy of its data directory at
        *target* (written beside it, then renamed: never half there), then :meth:`stop`.
        True when kept; the copy can seed a later server (``seed=``).
        """
        if self._owner_pid and self._owner_pid != os.getpid():
            return False
        process, run_dir = self._process, self._run_dir
        kept = False
        try:
            if process is None or run_dir is None or process.poll() is not None:
                return False
            self._stop_processes()
            clean = process.returncode == 0 and not (run_dir / "data" / "postmaster.pid").exists()
            if not clean:
                log.debug("server %d did not shut down cleanly: nothing kept", process.pid)
                return False
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                _cache.copy_tree(run_dir / "data", staging, self.server_user)
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
                kept = True
            except OSError as exc:
                log.warning("could not keep the data directory in %s: %s", target, exc)
                shutil.rmtree(staging, ignore_errors=True)
            return kept
        finally:
            self._teardown()

    def _stop_processes(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # Fast shutdown (SIGINT) takes ~10 ms with fsync off; escalate if it hangs.
            for sig, grace in ((signal.SIGINT, 5.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
                try:
                    process.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    log.warning("server %d ignored %s; escalating", process.pid, sig.name)
        elif process is not None:
            process.wait()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            # It exits on its own once the postmaster is gone.
            try:
                watchdog.wait(2.0)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait()

    def _teardown(self) -> None:
        self._stop_processes()
        self._password = ""
        run_dir, self._run_dir = self._run_dir, None
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        atexit.unregister(self._atexit)

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


def _interpreter() -> str:
    """A Python to run the (standard-library only) watchdog script with.

    ``sys.executable`` may be unreachable after a process dropped privileges (a venv under
    ``/root``); any ``python3`` on PATH can run the script then.
    """
    if sys.executable and os.access(sys.executable, os.X_OK):
        return sys.executable
    return shutil.which("python3") or shutil.which("python") or sys.executable


def scram_verifier(password: str, iterations: int = _SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for *password* (RFC 5802 and 7677).

    ``ALTER ROLE ... PASSWORD`` takes it as is (PostgreSQL 10+), with our iteration count.
    """
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _lost_port(log_text: str) -> bool:
    """Whether the server failed because its TCP port was taken (worth another port)."""
    return "could not bind" in log_text and "already in use" in log_text


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
