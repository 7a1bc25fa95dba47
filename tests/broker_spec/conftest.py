"""Backends for the shared behavioural suite.

Every test taking ``backend`` runs against each backend whose client class implements
the operations the test declares with ``@needs(...)`` (detected with ``hasattr``), so the
Unix-socket broker joins a test as soon as it grows the operation; no test is skipped
for a missing operation, it is simply not generated.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

BACKENDS = ("socket", "redis")
#: Short sessions so a killed process's claims are freed fast (heartbeat every third).
SESSION_TTL = 1.5
ROOT = Path(__file__).resolve().parents[2]


def client_class(backend: str) -> type:
    if backend == "socket":
        from corral.broker import Client

        return Client
    from corral.broker.redis import RedisClient

    return RedisClient


def async_client_class(backend: str) -> type:
    if backend == "socket":
        from corral.broker import AsyncClient

        return AsyncClient
    from corral.broker.redis import AsyncRedisClient

    return AsyncRedisClient


def needs(*operations: str) -> Callable[[F], F]:
    """Declare the client methods a test needs; it runs on every backend that has them."""

    def mark(fn: F) -> F:
        fn.needs = operations  # type: ignore[attr-defined]
        return fn

    return mark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    ops = getattr(metafunc.function, "needs", ())
    params = [
        name
        for name in BACKENDS
        if all(
            hasattr(client_class(name), op) and hasattr(async_client_class(name), op) for op in ops
        )
    ]
    metafunc.parametrize("backend", params, indirect=True)


class Backend:
    """One backend for one test: fresh state, clients, and real worker processes."""

    def __init__(self, name: str, env: dict[str, str], make: Callable[..., Any],
                 make_async: Callable[..., Any]) -> None:  # fmt: skip
        self.name = name
        self.env = env
        self._make = make
        self._make_async = make_async
        self._clients: list[Any] = []
        self._procs: list[subprocess.Popen[str]] = []

    def client(self) -> Any:
        """A new blocking client of this test's run (closed after the test)."""
        client = self._make()
        self._clients.append(client)
        return client

    def async_client(self) -> Any:
        """A new asyncio client; the test closes it (``async with``)."""
        return self._make_async()

    def spawn(self, role: str, *args: object) -> subprocess.Popen[str]:
        """Start ``tests/broker_spec/_worker.py ROLE ARGS`` using ``Client()`` from the env."""
        env = dict(os.environ)
        for var in ("CORRAL_BROKER_URL", "CORRAL_RUN_ID", "EPHEMERAL_PIPE", "EPHEMERAL_SECRET"):
            env.pop(var, None)
        env.update(self.env)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.broker_spec._worker", role, *map(str, args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for client in self._clients:
            client.close()


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "it") -> Any:
    """Poll *condition* (test-side only) until truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def waiting(client: Any, kind: str, name: str) -> int:
    """How many clients wait for *kind* *name* (from ``status()``)."""
    return sum(1 for w in client.status()["waiters"] if w["kind"] == kind and w["name"] == name)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    name = request.param
    if name == "socket":
        from corral.broker import AsyncClient, Broker, Client

        broker: Broker = request.getfixturevalue("make_broker")(require_ttl=False)
        path = broker.path
        env = {"EPHEMERAL_PIPE": path}
        spec = Backend(name, env, lambda: Client(path), lambda: AsyncClient(path))
        yield spec
        spec.close()
        return
    from corral.broker.redis import AsyncRedisClient, RedisClient

    url: str = request.getfixturevalue("redis_url")
    run_id = f"spec-{uuid.uuid4().hex[:12]}"
    options: dict[str, Any] = {"run_id": run_id, "session_ttl": SESSION_TTL}
    env = {
        "CORRAL_BROKER_URL": url,
        "CORRAL_RUN_ID": run_id,
        "CORRAL_SESSION_TTL": str(SESSION_TTL),
    }
    spec = Backend(
        name, env, lambda: RedisClient(url, **options), lambda: AsyncRedisClient(url, **options)
    )
    yield spec
    spec.close()
    with RedisClient(url, run_id=run_id) as janitor:
        janitor.purge()
