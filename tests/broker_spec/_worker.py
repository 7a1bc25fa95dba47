"""A worker process for the multi-process tests: ``python -m tests.broker_spec._worker ROLE``.

It connects with a bare ``Client()`` (the backend comes from the environment, as in a real
run), does one job and prints JSON lines the test reads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from corral import Client
from corral.errors import BarrierBroken, BrokerTimeout, ClaimLost, OnceFailed


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def once(client: Any, key: str, mode: str) -> None:
    def compute() -> Any:
        client.incr("computed")
        if mode == "hang":
            say(computing=True)
            time.sleep(3600)
        time.sleep(0.2)  # long enough for every racer to be waiting
        if mode == "raise":
            raise RuntimeError("setup exploded")
        return {"template": "db-1"}

    try:
        say(value=client.once(key, compute, timeout=60))
    except OnceFailed as exc:
        say(failed=exc.message, type=exc.error_type)
    except RuntimeError as exc:
        say(raised=str(exc))


def incr(client: Any, times: int) -> None:
    for _ in range(times):
        client.incr("total")
    say(done=True)


def pool(client: Any, name: str, rounds: int) -> None:
    client.pool(name, ["db-a", "db-b"])
    for _ in range(rounds):
        with client.acquire(name, timeout=60) as item:
            inside = client.incr("inside")
            if inside > 2:
                client.incr("violations")
            client.incr(f"used-{item}")
            time.sleep(0.005)
            client.incr("inside", -1)
    say(done=True)


def hold_lock(client: Any, name: str) -> None:
    with client.lock(name) as token:
        say(token=token)
        time.sleep(3600)


def hold_lease(client: Any, key: str) -> None:
    say(number=client.lease(key, f"worker-{os.getpid()}", ttl=600))
    time.sleep(3600)


def pause_holder(client: Any, name: str) -> None:
    """Hold a lock across a pause (the test SIGSTOPs us) and report whether it was lost."""
    try:
        with client.lock(name) as token:
            say(token=token)
            time.sleep(1.0)
    except ClaimLost as exc:
        say(lost=str(exc))
    else:
        say(lost=None)


def wait_lock(client: Any, name: str) -> None:
    with client.lock(name, timeout=60) as token:
        say(token=token, at=time.time())


def barrier(client: Any, name: str, parties: int) -> None:
    try:
        say(index=client.barrier(name, parties, timeout=60), at=time.time())
    except BarrierBroken as exc:
        say(broken=exc.reason, at=time.time())


def consume(client: Any, queue: str) -> None:
    got = []
    while True:
        try:
            item = client.pop(queue, timeout=30)
        except BrokerTimeout:
            break
        if item == "STOP":
            break
        got.append(item)
    say(items=got)


def consume_one(client: Any, queue: str) -> None:
    client.ping()  # connected: what is left before blocking is a few microseconds
    say(waiting=True)
    say(item=client.pop(queue, timeout=30))


def main(argv: list[str]) -> None:
    role, args = argv[0], argv[1:]
    with Client() as client:
        if role == "once":
            once(client, args[0], args[1])
        elif role == "incr":
            incr(client, int(args[0]))
        elif role == "pool":
            pool(client, args[0], int(args[1]))
        elif role == "hold_lock":
            hold_lock(client, args[0])
        elif role == "hold_lease":
            hold_lease(client, args[0])
        elif role == "pause_holder":
            pause_holder(client, args[0])
        elif role == "wait_lock":
            wait_lock(client, args[0])
        elif role == "barrier":
            barrier(client, args[0], int(args[1]))
        elif role == "consume_one":
            consume_one(client, args[0])
        elif role == "consume":
            consume(client, args[0])
        else:
            raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
