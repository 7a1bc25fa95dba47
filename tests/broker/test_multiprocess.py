"""Several real processes share one broker: consistent answers, and a killed holder's
lease is freed the moment its connection drops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from corral.broker import Broker, Client

WORKER = """
import json, os, sys, time
from corral import Client
n = int(sys.argv[1])
with Client() as c:
    slot = c.lease("slots", f"worker-{n}")
    for i in range(300):
        c.set(f"w{n}", i, ttl=60)
        assert c.get(f"w{n}") == i
        c.set(f"shared-{i % 5}", [n, i], ttl=60)
    c.set(f"leased-{n}", slot, ttl=60)
    while sum(k.startswith("leased-") for k in c.keys()) < 4:
        time.sleep(0.005)  # hold the lease until every worker has one
    print(json.dumps({"n": n, "slot": slot, "pid": os.getpid()}))
"""


def test_processes_share_one_broker(broker: Broker) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(n)], stdout=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        reports.append(json.loads(out))
    assert sorted(r["slot"] for r in reports) == [0, 1, 2, 3]  # every worker its own number
    with Client(broker.path) as c:
        assert [c.get(f"w{n}") for n in range(4)] == [299] * 4
        assert all(c.get(f"shared-{i}")[1] % 5 == i for i in range(5))
        # Each process's connection closed when it exited: its lease went with it (as
        # soon as the broker's loop sees the close, which may trail the exit a little).
        deadline = time.monotonic() + 5
        while c.stats()["leases"] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert c.stats()["leases"] == 0


HOLDER = """
import sys, time, pathlib
from corral import Client
c = Client()
print(c.lease("db", "holder", ttl=600), flush=True)
pathlib.Path(sys.argv[1]).touch()
time.sleep(600)
"""


def test_kill_9_of_a_lease_holder_frees_the_lease_at_once(broker: Broker, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready)], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with Client(broker.path) as c:
            assert c.lease("db", "other") == 1  # 0 is held (for 600 s by TTL)
            c.release("other")
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=10)
            killed_at = time.monotonic()
            while c.stats()["leases"] and time.monotonic() - killed_at < 5:
                time.sleep(0.001)
            assert time.monotonic() - killed_at < 1.0
            assert c.lease("db", "other") == 0
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()
