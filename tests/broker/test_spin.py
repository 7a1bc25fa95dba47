"""Busy-polling before sleeping: the policy, the selector, and who may spin for whom."""

from __future__ import annotations

import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral import Broker, Client
from corral.broker import _spin
from corral.broker._spin import (
    DEFAULT_BUDGET,
    SpinningSelector,
    SpinPolicy,
    budget_from_env,
    peer_in_other_process,
)
from corral.broker.messages import Call

linux_only = pytest.mark.skipif(
    not hasattr(socket, "SO_PEERCRED"), reason="SO_PEERCRED is Linux's: spinning is off elsewhere"
)


# ---------------------------------------------------------------------- the policy


def test_a_zero_budget_never_spins() -> None:
    policy = SpinPolicy(0.0)
    assert not any(policy.should_spin() for _ in range(100))


def test_a_miss_streak_rests_the_spin_then_it_is_tried_again() -> None:
    policy = SpinPolicy(50e-6)
    for _ in range(7):
        assert policy.should_spin()
        policy.miss()
    assert policy.should_spin()
    policy.miss()  # the 8th miss in a row
    rested = 0
    while not policy.should_spin():
        rested += 1
        assert rested < 1000
    assert rested == 64
    assert policy.misses == 0


def test_a_hit_breaks_the_miss_streak() -> None:
    policy = SpinPolicy(50e-6)
    for _ in range(20):
        for _ in range(7):
            policy.miss()
        policy.hit()
        assert policy.should_spin()


def test_budget_explicit_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_SPIN_US", raising=False)
    assert budget_from_env() == DEFAULT_BUDGET
    assert budget_from_env(0.0) == 0.0
    monkeypatch.setenv("CORRAL_SPIN_US", "120")
    assert budget_from_env() == pytest.approx(120e-6)
    assert budget_from_env(1e-5) == 1e-5  # an explicit value wins
    monkeypatch.setenv("CORRAL_SPIN_US", "  ")
    assert budget_from_env() == DEFAULT_BUDGET


@pytest.mark.parametrize("raw", ["abc", "-5", "nan"])
def test_a_bad_environment_value_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("CORRAL_SPIN_US", raw)
    with pytest.raises(ValueError, match=r"CORRAL_SPIN_US|spin budget"):
        budget_from_env()
    with pytest.raises(ValueError):
        Broker(require_ttl=False)
    with pytest.raises(ValueError):
        Client("/nonexistent/socket")


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="spin budget must be >= 0"):
        Broker(spin=-1.0)
    with pytest.raises(ValueError, match="spin budget must be >= 0"):
        Client("/nonexistent/socket", spin=-1e-6)


# ---------------------------------------------------------------------- the selector


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return


def _wake(sel: SpinningSelector, a: socket.socket, b: socket.socket) -> int:
    """Wake *sel* once with a byte from *b* to *a*, read it; how many keys were ready."""
    b.send(b"x")
    ready = len(sel.select(None))
    _drain(a)
    return ready


def test_an_idle_selector_sleeps_without_spinning(pair: tuple[socket.socket, ...]) -> None:
    a, _ = pair
    with SpinningSelector(1.0) as sel:
        sel.register(a, selectors.EVENT_READ)
        assert sel.select(0.01) == []
        assert sel.select(0.01) == []
        assert sel.policy.misses == 0  # never spun: no work came before


def test_after_work_the_selector_spins_once_then_sleeps(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    with SpinningSelector(0.001) as sel:
        sel.register(a, selectors.EVENT_READ)
        assert _wake(sel, a, b) == 1
        assert sel.select(0.01) == []  # spun 1 ms, found nothing, slept
        assert sel.policy.misses == 1
        assert sel.select(0.01) == []  # nothing came: no spin this time
        assert sel.policy.misses == 1


def test_work_arriving_during_the_spin_is_caught_by_it(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    with SpinningSelector(5.0) as sel:
        sel.register(a, selectors.EVENT_READ)
        _wake(sel, a, b)
        sel.policy.misses = 3
        writer = threading.Timer(0.01, b.send, args=(b"y",))
        writer.start()
        ready = sel.select(None)
        writer.join()
        assert [key.fileobj for key, _ in ready] == [a]
        assert sel.policy.misses == 0  # a hit: the spin returned it, not the sleep


def test_work_from_a_local_peer_does_not_start_a_spin(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    with SpinningSelector(1.0) as sel:
        sel.register(a, selectors.EVENT_READ)
        sel.local.add(a.fileno())
        assert _wake(sel, a, b) == 1
        assert sel.select(0.01) == []
        assert sel.policy.misses == 0


# ---------------------------------------------------------------------- who spins for whom


@linux_only
def test_peer_in_other_process(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert not peer_in_other_process(a)
    path = str(tmp_path / "s")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
            "print('ready', flush=True); c, _ = s.accept(); c.recv(1)\n",
            path,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            assert peer_in_other_process(sock)
            sock.send(b"x")
    finally:
        child.wait(10)
        assert child.stdout is not None
        child.stdout.close()


def _local_fds(broker: Broker) -> set[int]:
    """The connections the broker's selector knows to come from this process."""
    selector = broker._selector
    return set() if selector is None else selector.local


@linux_only
def test_client_and_broker_in_one_process_never_spin() -> None:
    with Broker(require_ttl=False, spin=50e-6) as broker, Client(broker.path, spin=50e-6) as c:
        c.set("k", 1)
        assert c.get("k") == 1
        assert c._spin.budget == 0.0
        assert _local_fds(broker)  # the broker knows this connection is ours
    assert not _local_fds(broker)


def test_a_clients_extra_connections_keep_its_spin_budget() -> None:
    # Requests that wait (lock, acquire, once, ...) run on extra connections of the client:
    # Client(spin=0) must not busy-poll there with the default budget.
    with Broker(require_ttl=False) as broker, Client(broker.path, spin=0) as c:
        with c.lock("l"):
            pass
        assert c._spares
        assert [spare._spin_budget for spare in c._spares] == [0.0]


@linux_only
def test_a_client_in_another_process_spins_and_is_answered() -> None:
    code = (
        "import sys\n"
        "from corral import Client\n"
        "c = Client(sys.argv[1], spin=50e-6)\n"
        "for n in range(200):\n"
        "    c.set('k', n)\n"
        "    assert c.get('k') == n\n"
        "print(c._spin.budget)\n"
    )
    with Broker(require_ttl=False, spin=50e-6) as broker:
        out = subprocess.run(
            [sys.executable, "-c", code, broker.path], capture_output=True, text=True, check=True
        )
        assert float(out.stdout) == 50e-6
        assert not _local_fds(broker)  # the child's connection was not a local one


def test_every_poll_yields_the_cpu(
    monkeypatch: pytest.MonkeyPatch, pair: tuple[socket.socket, ...]
) -> None:
    """A poller must yield between polls: its peer may be waiting for this very CPU.

    Without it, two peers the scheduler put on one CPU measured 108 µs per raw round trip
    instead of 9 (the poller held the CPU until its time slice ended).
    """
    import corral.broker._spin as spin

    yields: list[None] = []
    monkeypatch.setattr(spin, "_sched_yield", lambda: yields.append(None))
    a, b = pair
    with SpinningSelector(0.002) as sel:
        sel.register(a, selectors.EVENT_READ)
        _wake(sel, a, b)
        assert sel.select(0.001) == []  # a 2 ms spin that finds nothing
    assert len(yields) > 1
    yields.clear()
    with Broker(require_ttl=False) as broker:
        c = Client(broker.path, spin=0.002)
        c._spin = SpinPolicy(0.002)  # as if the broker were in another process
        with c:
            c.ping()  # connects (which resets the policy: same process)
            for _ in range(20):
                c._spin = SpinPolicy(0.002)
                assert c.get("missing", None) is None
    assert yields  # the client polled, yielding, before the answer came


@linux_only
def test_an_idle_broker_stops_spinning() -> None:
    """After a burst from another process the broker goes back to sleep (CPU, not speed)."""
    code = (
        "import sys\n"
        "from corral import Client\n"
        "c = Client(sys.argv[1])\n"
        "for n in range(2000):\n"
        "    c.get('k', None)\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"  # keep the connection open while the parent measures
    )
    with Broker(require_ttl=False, spin=0.01) as broker:  # a huge budget: 10 ms per spin
        child = subprocess.Popen(
            [sys.executable, "-c", code, broker.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "done"
            before = resource.getrusage(resource.RUSAGE_SELF)
            time.sleep(1.0)
            after = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(10)
            assert child.stdout is not None
            child.stdout.close()
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert used < 0.3, f"the broker kept spinning: {used:.2f} s of CPU in 1 s idle"


def test_spin_off_still_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_SPIN_US", "0")
    with Broker(require_ttl=False) as broker, Client(broker.path) as c:
        assert broker.spin == 0.0
        c.set("k", [1, 2])
        assert c.get("k") == [1, 2]
        assert os.environ["EPHEMERAL_PIPE"] == broker.path


def test_handing_over_stands_the_selector_down(pair: tuple[socket.socket, ...]) -> None:
    """After waking a waiter the broker sleeps at once: the waiter needs the CPU."""
    a, b = pair
    with SpinningSelector(1.0) as sel:
        sel.register(a, selectors.EVENT_READ)
        _wake(sel, a, b)
        sel.stand_down()
        assert sel.select(0.01) == []
        assert sel.policy.missed == 0  # it did not spin


def test_requests_that_wake_a_waiter_do_not_poll() -> None:
    from corral.broker import _flows
    from corral.broker._flows import Grant

    def first_call(flow: Any) -> Call:
        call = next(flow)
        assert isinstance(call, Call)
        return call

    grant = Grant("lock", "L", 7, 0, None)
    assert first_call(_flows.give_back(grant)).wakes
    assert first_call(_flows.push("q", ("item",))).wakes
    assert not first_call(_flows.get("k")).wakes
    assert not first_call(_flows.ping()).wakes


def test_the_spin_polls_the_selector_through_public_apis(pair: tuple[socket.socket, ...]) -> None:
    """The probe polls the epoll descriptor (``fileno()``), not the selector's private
    epoll object; it sees readiness without consuming it (level-triggered)."""
    a, b = pair
    with SpinningSelector(0.001) as sel:
        sel.register(a, selectors.EVENT_READ)
        assert (sel._probe is not None) == hasattr(selectors, "EpollSelector")
        assert not sel._spin()
        b.send(b"x")
        assert sel._spin()
        assert sel._spin()
        assert [key.fileobj for key, _ in sel.select(0)] == [a]
    assert not re.search(r"[.\"]_selector\b", Path(_spin.__file__).read_text())
