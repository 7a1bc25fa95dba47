"""The CLI with real processes: ``corral run`` exit codes and signals, ``corral broker``,
and the debugging commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.broker import Broker

CORRAL = [sys.executable, "-m", "corral.cli"]
PY = sys.executable


def corral(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CORRAL, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_run_exits_with_the_command_exit_code(code: int) -> None:
    result = corral("run", "--", PY, "-c", f"raise SystemExit({code})")
    assert result.returncode == code, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_run_exits_128_plus_n_when_the_command_dies_of_a_signal(sig: int) -> None:
    result = corral("run", "--", PY, "-c", f"import os; os.kill(os.getpid(), {int(sig)})")
    assert result.returncode == 128 + sig


def test_run_gives_the_command_a_broker_and_cleans_up(tmp_path: Path) -> None:
    script = (
        "import os, json\n"
        "from corral import Client\n"
        "with Client() as c:\n"
        "    c.set('k', [1, 2], ttl=5)\n"
        "    print(json.dumps({'pipe': os.environ['EPHEMERAL_PIPE'], 'v': c.get('k'),"
        " 'secret': os.environ.get('EPHEMERAL_SECRET')}))\n"
    )
    result = corral("run", "--", PY, "-c", script)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["v"] == [1, 2]
    assert seen["secret"] is None
    assert not os.path.exists(seen["pipe"])
    assert not os.path.exists(os.path.dirname(seen["pipe"]))


def test_run_with_a_secret_passes_it_through_the_environment_only() -> None:
    script = (
        "import os, sys\n"
        "from corral import Client\n"
        "secret = os.environ['EPHEMERAL_SECRET']\n"
        "parent = open(f'/proc/{os.getppid()}/cmdline', 'rb').read()\n"
        "assert secret.encode() not in parent\n"
        "with Client() as c:\n"
        "    c.set('k', 1, ttl=5)\n"
        "with Client(secret='wrong') as c:\n"
        "    try:\n"
        "        c.ping()\n"
        "    except PermissionError:\n"
        "        sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    assert corral("run", "--secret-env", "--", PY, "-c", script).returncode == 0
    env = {**os.environ, "MY_SECRET": "from-env"}
    check = "import os; assert os.environ['EPHEMERAL_SECRET'] == 'from-env'"
    result = corral("run", "--secret-env", "MY_SECRET", "--", PY, "-c", check, env=env)
    assert result.returncode == 0, result.stderr
    result = corral("run", "--secret-env", "UNSET_VAR", "--", "true")
    assert result.returncode == 2
    assert "UNSET_VAR" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_run_forwards_signals(tmp_path: Path, sig: int) -> None:
    ready = tmp_path / "ready"
    script = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal({int(sig)}, lambda *a: sys.exit(40 + {int(sig)}))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.Popen([*CORRAL, "run", "--", PY, "-c", script])
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.02)
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 40 + sig


def test_run_reports_missing_commands() -> None:
    result = corral("run", "--", "definitely-not-a-command-xyz")
    assert result.returncode == 127
    assert "command not found" in result.stderr
    assert corral("run").returncode == 2


def test_broker_command_serves_until_sigterm() -> None:
    with subprocess.Popen(
        [*CORRAL, "broker", "--no-require-ttl"], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        serve_and_stop(proc, path)
    assert not os.path.exists(path)


def serve_and_stop(proc: subprocess.Popen[str], path: str) -> None:
    try:
        env = {**os.environ, "EPHEMERAL_PIPE": path}
        assert corral("set", "greeting", '{"hello": "world"}', env=env).returncode == 0
        got = corral("get", "greeting", env=env)
        assert json.loads(got.stdout) == {"hello": "world"}
        assert corral("set", "word", "not json", env=env).returncode == 0
        assert json.loads(corral("get", "word", env=env).stdout) == "not json"
        assert corral("set", "n", "12", "--string", "--ttl", "300", env=env).returncode == 0
        assert json.loads(corral("get", "n", env=env).stdout) == "12"
        assert corral("keys", env=env).stdout.split() == ["greeting", "n", "word"]
        assert corral("ping", env=env).stdout.endswith(" ms\n")
        assert json.loads(corral("stats", env=env).stdout)["items"] == 3
        assert json.loads(corral("health", env=env).stdout)["status"] == "healthy"
        assert "ephemeral_broker_requests_total" in corral("metrics", env=env).stdout
        assert corral("del", "n", env=env).returncode == 0
        gone = corral("del", "n", env=env)
        assert gone.returncode == 1
        missing = corral("get", "n", env=env)
        assert missing.returncode == 1
        assert "not_found" in missing.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_broker_command_refuses_a_live_socket(broker: Broker) -> None:
    result = corral("broker", "--socket", broker.path)
    assert result.returncode == 3
    assert "already running" in result.stderr


def test_client_commands_without_a_broker(tmp_path: Path) -> None:
    env = {**os.environ, "EPHEMERAL_PIPE": str(tmp_path / "nothing.sock")}
    result = corral("ping", env=env)
    assert result.returncode == 3
    assert "cannot reach the broker" in result.stderr
    env.pop("EPHEMERAL_PIPE")
    result = corral("keys", env=env)
    assert result.returncode == 3
    assert "EPHEMERAL_PIPE" in result.stderr


def test_status_without_a_broker_names_the_socket_flag_and_the_running_brokers(
    broker: Broker,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EPHEMERAL_PIPE"}
    result = corral("status", env=env)
    assert result.returncode == 3
    assert result.stderr.startswith("corral: no broker given: pass --socket PATH, or set ")
    assert "path=" not in result.stderr
    assert broker.path in result.stderr  # this user's brokers, to pass with --socket
    assert corral("status", "--socket", broker.path, env=env).returncode == 0


def test_main_is_callable_in_process(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    from corral.cli import main

    assert main(["set", "--socket", broker.path, "k", "[1]"]) == 0
    assert main(["get", "--socket", broker.path, "k"]) == 0
    assert json.loads(capsys.readouterr().out) == [1]


def test_broker_command_stops_itself_when_idle() -> None:
    with subprocess.Popen(
        [*CORRAL, "broker", "--idle-timeout", "0.3"], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        assert os.path.exists(path)
        assert proc.wait(timeout=20) == 0
    assert not os.path.exists(path)
