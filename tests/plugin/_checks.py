"""What an inner run must leave behind: nothing. Helpers shared by the plugin tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from corral.postgres import clone_database, drop_database, list_databases
from corral.postgres._sql import connect

SAMPLE = Path(__file__).parent / "sample"


def facts(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def processes_of_run(run_id: str) -> list[int]:
    """Pids of live processes whose environment names this run (workers, servers...)."""
    needle = f'"run_id": "{run_id}"'.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ:
            found.append(int(entry))
    return found


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains *text*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


def redis_keys(url: str, run_id: str) -> list[bytes]:
    """The keys of a Redis run still on the server."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=f"corral:{{{run_id}}}:*"))
    finally:
        client.close()


def server_dir(url: str) -> str | None:
    """The throwaway server's run directory (its socket directory), if the URL has one."""
    hosts = parse_qs(urlsplit(url).query).get("host", [])
    return hosts[0] if hosts and "corral-pg" in hosts[0] else None


def run_id_of(url: str) -> str:
    """``corral_<run>_<slot>`` -> run."""
    name = urlsplit(url).path.lstrip("/") or parse_qs(urlsplit(url).query)["dbname"][0]
    return name.split("_")[1]


def clones_of_run(admin_dsn: str, run_id: str) -> list[str]:
    return [
        db.name
        for db in list_databases(admin_dsn)
        if db.kind == "clone" and (db.run == run_id or db.name.startswith(f"corral_{run_id}_"))
    ]


def template_rows(admin_dsn: str, template: str) -> list[str]:
    """The ``item`` names in the template, read through a throwaway clone."""
    name = clone_database(admin_dsn, template)
    try:
        from corral.postgres import database_dsn

        with connect(database_dsn(admin_dsn, name)) as conn:
            return [r[0] for r in conn.execute("SELECT name FROM item ORDER BY id").fetchall()]
    finally:
        drop_database(admin_dsn, name)


def assert_nothing_left(info: dict[str, Any], admin_dsn: str | None) -> None:
    """No socket, no process, no clone database of the run; the template unchanged."""
    pipe = info["pipe"]
    assert pipe, "the inner run exported no EPHEMERAL_PIPE"
    assert not os.path.exists(pipe), f"broker socket left: {pipe}"
    assert not os.path.exists(os.path.dirname(pipe)), "broker directory left"
    run_id = run_id_of(info["url"])
    assert processes_of_run(run_id) == []
    directory = info.get("server_dir") or server_dir(info["url"])
    if admin_dsn is None and directory is not None:  # the run's own throwaway server
        assert not os.path.exists(directory), f"server directory left: {directory}"
        assert processes_mentioning(directory) == [], "a server process is left"
    if admin_dsn is not None:
        assert clones_of_run(admin_dsn, run_id) == []
        templates = [db.name for db in list_databases(admin_dsn) if db.kind == "template"]
        template = next(t for t in templates if t == info["template"])
        assert template_rows(admin_dsn, template) == ["seed"]


def interrupt_pytest(
    cwd: Path, args: list[str], ready: Path, settle: float = 0.0
) -> tuple[int, str]:
    """Run ``pytest *args`` in *cwd*, press Ctrl-C once *ready* exists (and *settle*
    seconds more), and return its exit code and output (stdout and stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A runner that started us in the background may have SIGINT ignored; Ctrl-C
        # must reach this pytest as it would from a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, f"{ready.name} never appeared"
            time.sleep(0.02)
        time.sleep(settle)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out
