"""A real Redis for the tests: ``CORRAL_TEST_REDIS_URL`` when it answers, else our own.

``redis_url`` is session-scoped: without a reachable ``CORRAL_TEST_REDIS_URL`` it starts
``redis-server`` on a Unix socket in a private temporary directory (no persistence) and
stops it after the session. Tests isolate themselves with a fresh run id each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests._requires import require_binary


def _answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("CORRAL_TEST_REDIS_URL")
    if url and _answers(url):
        yield url
        return
    binary = require_binary("redis-server")
    workdir = tempfile.mkdtemp(prefix="corral-redis-")  # short: socket paths max ~100 bytes
    sock = os.path.join(workdir, "redis.sock")
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", workdir, "--logfile", "redis.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 10
        while not (os.path.exists(sock) and _answers(url)):
            if proc.poll() is not None or time.monotonic() > deadline:
                log_path = os.path.join(workdir, "redis.log")
                log = open(log_path).read() if os.path.exists(log_path) else ""  # noqa: SIM115
                pytest.fail(f"redis-server did not start: {log[-2000:]}")
            time.sleep(0.01)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)
