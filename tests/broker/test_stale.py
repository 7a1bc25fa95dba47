"""Brokers killed with -9 leave their socket and 0700 directory behind: the next broker
(or ``corral run``) removes the ones it can prove dead, and never another live run's."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.broker import Broker, Client

CHILD = """
import sys, time
from corral.broker import Broker
broker = Broker(require_ttl=False)
print(broker.start(), flush=True)
time.sleep(120)
"""


@pytest.fixture
def tmpdir_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A short private temporary directory, as TMPDIR for this process and children."""
    base = tempfile.mkdtemp(prefix="cst-", dir="/tmp")
    monkeypatch.setenv("TMPDIR", base)
    monkeypatch.setattr(tempfile, "tempdir", base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _child_broker(base: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "TMPDIR": base}
    command = [sys.executable, "-c", CHILD]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    path = proc.stdout.readline().strip()
    assert path.startswith(base), path
    return proc, path


def _kill(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_broker_killed_with_kill_9_is_cleaned_up_by_the_next(tmpdir_base: str) -> None:
    killed, killed_path = _child_broker(tmpdir_base)
    live, live_path = _child_broker(tmpdir_base)
    listener = socket.socket(socket.AF_UNIX)
    try:
        _kill(killed)
        killed_dir = os.path.dirname(killed_path)
        assert os.path.exists(killed_path)  # kill -9: no atexit, no stop()

        # Directories that cannot be proven dead stay.
        dead = _dead_pid()
        listening = Path(tmpdir_base, f"corral-{dead}-listening")  # a live listener
        listening.mkdir(mode=0o700)
        listener.bind(str(listening / "broker-abc.sock"))
        listener.listen(1)
        mine = Path(tmpdir_base, f"corral-{os.getpid()}-mine")  # its owner is alive
        mine.mkdir(mode=0o700)
        stray = Path(tmpdir_base, f"corral-{dead}-stray")  # holds something else
        stray.mkdir(mode=0o700)
        (stray / "notes.txt").write_text("not a socket")
        legacy = Path(tmpdir_base, "corral-abcd1234")  # no owner pid in the name
        legacy.mkdir(mode=0o700)
        empty = Path(tmpdir_base, f"corral-{dead}-empty")  # killed before it bound
        empty.mkdir(mode=0o700)

        with Broker() as broker:
            assert os.path.dirname(broker.path).startswith(
                os.path.join(tmpdir_base, f"corral-{os.getpid()}-")
            )
            assert not os.path.exists(killed_dir)
            assert not empty.exists()
            for kept in (listening, mine, stray, legacy):
                assert kept.exists(), kept
            assert os.path.exists(live_path)
            with Client(live_path) as c:  # the other live run was left alone
                assert c.ping() >= 0
    finally:
        listener.close()
        _kill(killed)
        _kill(live)


def test_corral_run_cleans_up_too(tmpdir_base: str) -> None:
    killed, killed_path = _child_broker(tmpdir_base)
    _kill(killed)
    assert os.path.exists(killed_path)
    env = {**os.environ, "TMPDIR": tmpdir_base}
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "run", "--", sys.executable, "-c", "pass"],
        env=env,
        timeout=60,
    )
    assert done.returncode == 0
    assert not os.path.exists(os.path.dirname(killed_path))
    assert os.listdir(tmpdir_base) == []  # and its own files are gone after it
