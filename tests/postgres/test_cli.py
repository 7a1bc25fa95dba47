"""``corral postgres``: prints a working DSN, keeps the server up, leaves nothing on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg

_CLI = [sys.executable, "-m", "corral.cli", "postgres"]


def test_cli_serves_until_sigterm(runtime_dir: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.sql"
    schema.write_text("CREATE TABLE t (x int); INSERT INTO t VALUES (7);")
    cli_args = ["--schema", str(schema), "--set", "work_mem=16MB"]
    proc = subprocess.Popen(
        [*_CLI, *cli_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_env(), "CORRAL_PG_RUNTIME_DIR": str(runtime_dir)},
    )
    assert proc.stdout is not None
    try:
        admin = proc.stdout.readline().strip()
        clone = proc.stdout.readline().strip()
        with psycopg.connect(admin) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("16MB",)
        with psycopg.connect(clone) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (7,)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Ctrl-C stops it" in err
    run_dir = Path(parse_qs(urlsplit(admin).query)["host"][0])
    assert not run_dir.exists()


def test_cli_tcp_prints_the_url_the_plugin_hands_out(runtime_dir: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.sql"
    schema.write_text("CREATE TABLE t (x int); INSERT INTO t VALUES (7);")
    proc = subprocess.Popen(
        [*_CLI, "--tcp", "--schema", str(schema)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_env(), "CORRAL_PG_RUNTIME_DIR": str(runtime_dir)},
    )
    assert proc.stdout is not None
    try:
        dsn, url, clone = (proc.stdout.readline().strip() for _ in range(3))
        socket_dir = parse_qs(urlsplit(dsn).query)["host"][0]
        for each in (url, clone):
            split = urlsplit(each)
            assert (split.hostname, split.username) == ("127.0.0.1", "postgres")
            assert split.port
            assert split.password
            assert parse_qs(split.query) == {"host": [socket_dir]}
        assert urlsplit(url).path == "/postgres"
        with psycopg.connect(clone) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (7,)
        with psycopg.connect(url.split("?")[0]) as conn:  # TCP, with the password
            assert conn.execute("SELECT host(inet_server_addr())").fetchone() == ("127.0.0.1",)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_cli_reports_a_failed_start(runtime_dir: Path) -> None:
    result = subprocess.run(
        [*_CLI, "--set", "max_connections=-5"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(), "CORRAL_PG_RUNTIME_DIR": str(runtime_dir)},
    )
    assert result.returncode == 1
    assert "max_connections" in result.stderr
    assert result.stdout == ""


def _env() -> dict[str, str]:
    return dict(os.environ)


def test_cli_rejects_a_malformed_setting() -> None:
    from corral.cli import main

    assert main(["postgres", "--set", "no-equals-sign"]) == 2
