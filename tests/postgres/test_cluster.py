"""EphemeralPostgres: start/stop as root and as a normal user, caching, crash clean-up."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from corral.errors import PostgresStartError
from corral.postgres import EphemeralPostgres
from corral.postgres._procs import is_alive
from tests.postgres.conftest import run_dirs


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_start_stop_leaves_nothing(runtime_dir: Path) -> None:
    server = EphemeralPostgres(runtime_dir=runtime_dir)
    assert server.start() is server
    run_dir, pid = Path(server.host), server.pid
    with psycopg.connect(server.dsn) as conn:
        row = conn.execute(
            "SELECT current_user, current_setting('fsync'), current_setting('synchronous_commit'),"
            " current_setting('full_page_writes'), current_setting('listen_addresses')"
        ).fetchone()
    assert row == ("postgres", "off", "off", "off", "")
    assert server.dsn.startswith("postgresql://postgres@/postgres?host=")
    if os.geteuid() == 0:
        # initdb and postgres refuse root: the server runs as an unprivileged user.
        assert _uid_of(pid) == server.server_user.uid != 0
    server.stop()
    assert not server.running
    assert not run_dir.exists()
    assert not is_alive(pid)
    server.stop()  # idempotent
    assert run_dirs(runtime_dir) == []


def test_context_manager_and_settings(runtime_dir: Path) -> None:
    settings = {"work_mem": "8MB", "autovacuum": None}
    with EphemeralPostgres(runtime_dir=runtime_dir, settings=settings, tcp=True) as server:
        with psycopg.connect(server.tcp_dsn) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
            # None drops corral's default (off), so PostgreSQL's own default (on) applies.
            assert conn.execute("SHOW autovacuum").fetchone() == ("on",)
        assert server.port > 0
        run_dir = Path(server.host)
    assert not run_dir.exists()


def _refused(dsn: str) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn).close()
    return str(info.value)


def test_tcp_asks_for_a_password_the_socket_does_not(runtime_dir: Path) -> None:
    from pydantic import PostgresDsn, TypeAdapter
    from sqlalchemy.engine import make_url

    with EphemeralPostgres(runtime_dir=runtime_dir, tcp=True) as server:
        password = server.password
        assert len(password) >= 32
        assert (
            server.tcp_dsn == f"postgresql://postgres:{password}@127.0.0.1:{server.port}/postgres"
        )
        # Every strict URL parser takes it: it has a host and a port.
        dsn = TypeAdapter(PostgresDsn).validate_python(server.tcp_dsn_for("app"))
        assert dsn.hosts()[0]["host"] == "127.0.0.1"
        assert make_url(server.tcp_dsn).port == server.port
        with psycopg.connect(server.tcp_dsn) as conn:
            assert conn.info.hostaddr == "127.0.0.1"
            # A verifier, not the password: nothing holds the password in clear.
            stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
            assert str(stored.fetchone()).startswith("('SCRAM-SHA-256$")
        without = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        assert "no password supplied" in _refused(without)
        assert "password authentication failed" in _refused(server.tcp_dsn.replace(password, "x"))
        with psycopg.connect(server.dsn) as conn:  # the private socket trusts
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # url: the TCP URL for parsers, with the socket directory that libpq prefers.
        assert server.url_for("app") == f"{server.tcp_dsn_for('app')}?host={server.host}"
        assert TypeAdapter(PostgresDsn).validate_python(server.url).hosts()[0]["port"] == (
            server.port
        )
        with psycopg.connect(server.url) as conn:
            assert conn.info.hostaddr == ""  # the socket
        assert password not in server.log_text()


def test_a_given_non_ascii_password_is_hashed_by_the_server(runtime_dir: Path) -> None:
    with EphemeralPostgres(runtime_dir=runtime_dir, tcp=True, password="pä ss:@/") as server:
        assert server.tcp_dsn.startswith("postgresql://postgres:p%C3%A4%20ss%3A%40%2F@127.0.0.1:")
        with psycopg.connect(server.tcp_dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_two_tcp_servers_started_side_by_side_get_ports_of_their_own(runtime_dir: Path) -> None:
    import threading

    servers = [EphemeralPostgres(runtime_dir=runtime_dir, tcp=True) for _ in range(3)]
    errors: list[BaseException] = []

    def start(server: EphemeralPostgres) -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert len({s.port for s in servers}) == 3
        for server in servers:
            with psycopg.connect(server.tcp_dsn) as conn:
                assert conn.execute("SHOW port").fetchone() == (str(server.port),)
    finally:
        for server in servers:
            server.stop()


def test_a_port_taken_before_the_server_binds_it_is_replaced(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.postgres import _cluster

    # Another process takes the port between corral's pick and the server's bind: the
    # first pick is a port that is listened on already.
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = iter([taken.getsockname()[1]])
    real = _cluster._free_port
    monkeypatch.setattr(_cluster, "_free_port", lambda: next(picks, None) or real())
    try:
        with EphemeralPostgres(runtime_dir=runtime_dir, tcp=True) as server:
            assert server.port != taken.getsockname()[1]
            assert "could not bind" in server.log_text()
            with psycopg.connect(server.tcp_dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        taken.close()


def test_cold_then_warm_cache(runtime_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with EphemeralPostgres(runtime_dir=runtime_dir, cache_dir=cache) as cold:
        assert cold.cache_hit is False
        cold_seconds = cold.start_seconds
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1
    assert (entries[0] / "meta.json").is_file()
    with EphemeralPostgres(runtime_dir=runtime_dir, cache_dir=cache) as warm:
        assert warm.cache_hit is True
        with psycopg.connect(warm.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    print(f"cold start {cold_seconds:.3f} s, warm start {warm.start_seconds:.3f} s")
    # Different initdb arguments are a different cluster: their own cache entry.
    with EphemeralPostgres(
        runtime_dir=runtime_dir, cache_dir=cache, initdb_args=["--data-checksums"]
    ) as checksums:
        assert checksums.cache_hit is False
        with psycopg.connect(checksums.dsn) as conn:
            assert conn.execute("SHOW data_checksums").fetchone() == ("on",)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_start_failure_shows_the_log_and_leaves_nothing(runtime_dir: Path) -> None:
    server = EphemeralPostgres(runtime_dir=runtime_dir, settings={"shared_buffers": "lots"})
    with pytest.raises(PostgresStartError, match="shared_buffers") as info:
        server.start()
    assert "Last lines of its log" in str(info.value)
    assert "shared_buffers" in info.value.log
    assert not server.running
    assert run_dirs(runtime_dir) == []


def test_too_deep_runtime_dir_is_a_clear_error(runtime_dir: Path) -> None:
    deep = runtime_dir / ("d" * 100)
    with pytest.raises(PostgresStartError, match="CORRAL_PG_RUNTIME_DIR"):
        EphemeralPostgres(runtime_dir=deep).start()
    assert run_dirs(deep) == []


def test_stale_directory_without_owner_file_is_left_while_young(runtime_dir: Path) -> None:
    from corral.postgres import cleanup_stale_clusters

    young = runtime_dir / "run-starting"
    young.mkdir()
    old = runtime_dir / "run-abandoned"
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    broken = runtime_dir / "run-broken"
    broken.mkdir()
    owner = {"pid": "not a number", "host": socket.gethostname()}
    (broken / "owner.json").write_text(json.dumps(owner))
    assert cleanup_stale_clusters(runtime_dir) == [old]
    assert young.exists()
    assert broken.exists()  # logged and skipped, never fatal


def test_kept_log_path_survives_stop(runtime_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with EphemeralPostgres(runtime_dir=runtime_dir, log_path=log_path) as server:
        assert server.log_path == log_path
    assert log_path.exists()


_OWNER = textwrap.dedent(
    """
    import json, sys, time
    from corral.postgres import EphemeralPostgres
    server = EphemeralPostgres(runtime_dir=sys.argv[1], watchdog=sys.argv[2] == "1").start()
    print(json.dumps({"run_dir": server.host, "pid": server.pid}), flush=True)
    time.sleep(120)
    """
)


def _start_owner(runtime_dir: Path, watchdog: bool) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(runtime_dir), "1" if watchdog else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, "the owner process did not start a server"
    return owner, json.loads(line)


@pytest.mark.slow
def test_kill_9_of_owner_then_next_start_cleans_up(runtime_dir: Path) -> None:
    owner, info = _start_owner(runtime_dir, watchdog=False)
    owner.kill()
    owner.wait()
    owner.stdout.close()  # type: ignore[union-attr]
    # Without a watchdog the orphaned server keeps running...
    assert is_alive(info["pid"])
    assert Path(info["run_dir"]).exists()
    # ...until the next start notices that its owner is gone.
    with EphemeralPostgres(runtime_dir=runtime_dir) as server:
        assert not Path(info["run_dir"]).exists()
        assert _wait_until(lambda: not is_alive(info["pid"]))
        assert run_dirs(runtime_dir) == [Path(server.host)]


@pytest.mark.slow
def test_server_dies_soon_after_its_owner_is_killed(runtime_dir: Path) -> None:
    owner, info = _start_owner(runtime_dir, watchdog=True)
    assert is_alive(info["pid"])
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdout.close()  # type: ignore[union-attr]
    killed = time.monotonic()
    assert _wait_until(lambda: not is_alive(info["pid"]), timeout=10)
    assert _wait_until(lambda: not Path(info["run_dir"]).exists(), timeout=10)
    print(f"server and directory gone {time.monotonic() - killed:.3f} s after the owner")


def _child_as(user: pwd.struct_passwd, runtime: Path, cache: Path) -> dict[str, Any]:
    """Fork, drop to *user*, start and stop a server; return what the child saw."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.environ["HOME"] = str(cache)
            server = EphemeralPostgres(runtime_dir=runtime, cache_dir=cache).start()
            with psycopg.connect(server.dsn) as conn:
                (who,) = conn.execute("SELECT current_user").fetchone()  # type: ignore[misc]
            seen = {"user": who, "server_uid": _uid_of(server.pid), "run_dir": server.host}
            server.stop()
            seen["left"] = os.path.exists(seen["run_dir"])
            os.write(write_fd, json.dumps(seen).encode())
            code = 0
        except BaseException as exc:
            os.write(write_fd, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


@pytest.mark.slow
def test_start_stop_as_a_normal_user() -> None:
    if os.geteuid() != 0:
        with EphemeralPostgres() as server:
            assert _uid_of(server.pid) == os.geteuid()
        return
    user = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="corral-test-user-"))
    try:
        os.chmod(base, 0o755)
        runtime, cache = base / "run", base / "cache"
        for path in (runtime, cache):
            path.mkdir()
            os.chown(path, user.pw_uid, user.pw_gid)
        seen = _child_as(user, runtime, cache)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    assert "error" not in seen, seen.get("error")
    assert seen["user"] == "postgres"
    assert seen["server_uid"] == user.pw_uid
    assert seen["left"] is False


def test_pgserver_wheel_binaries_run_through_corrals_launcher(runtime_dir: Path) -> None:
    from corral.postgres._binaries import pgserver_bindir

    bindir = pgserver_bindir()
    if bindir is None:
        pytest.skip("the pgserver extra is not installed")
    # As root, the wheel usually sits under /root (0700): corral copies it where the server
    # user can run it, keeping the wheel's vendored-library layout.
    with EphemeralPostgres(bindir=bindir, runtime_dir=runtime_dir) as server:
        assert server.version[0] >= 16
        with psycopg.connect(server.dsn) as conn:
            (version,) = conn.execute("SHOW server_version_num").fetchone()  # type: ignore[misc]
        assert int(version) >= 160000
    assert run_dirs(runtime_dir) == []


def _default_sigquit() -> None:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_watchdog_tells_which_process_went_first(
    monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    from corral.postgres import _watchdog

    if not pidfd:  # old kernels and macOS have no pidfd_open
        monkeypatch.setattr(_watchdog, "_pidfd", lambda pid: None)
    # Each process exits by itself while the watchdog waits (a zombie until reaped).
    owner = subprocess.Popen(["sleep", "0.3"])
    # A stand-in for postgres, which handles SIGQUIT itself: `sleep` must die of it even
    # where this run inherited it ignored (started with `&` from a script).
    server = subprocess.Popen(["sleep", "60"], preexec_fn=_default_sigquit)
    other_owner = subprocess.Popen(["sleep", "60"])
    short_server = subprocess.Popen(["sleep", "0.3"])
    try:
        assert _watchdog._wait_for_either(owner.pid, "-", server.pid) is True
        _watchdog._stop(server.pid)  # SIGQUIT ends `sleep` too
        assert server.wait(5) == -signal.SIGQUIT
        assert _watchdog._wait_for_either(other_owner.pid, "-", short_server.pid) is False
    finally:
        for proc in (owner, server, other_owner, short_server):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
