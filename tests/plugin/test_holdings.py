"""``Broker.holdings()``: the snapshot behind the end-of-run "still held" warning."""

from __future__ import annotations

import time

import pytest

from corral.broker import Broker, Client


def test_holdings_lists_leases_oldest_first_with_holder_and_age() -> None:
    with Broker() as broker:
        assert broker.holdings() == []
        first, second = Client(broker.path), Client(broker.path)
        before = time.time()
        first.lease("printers", "test_a", ttl=60)
        time.sleep(0.01)
        second.lease("printers", "test_b", ttl=60)
        held = broker.holdings()
        assert [(h["key"], h["holder"], h["value"]) for h in held] == [
            ("printers", "test_a", 0),
            ("printers", "test_b", 1),
        ]
        assert all(h["kind"] == "lease" for h in held)
        # Wall-clock times come from the broker's monotonic clock plus the offset at the
        # moment of the snapshot, in milliseconds: allow that much jitter.
        assert before - 1 <= held[0]["since"] <= held[1]["since"] <= time.time() + 0.01
        assert held[0]["expires"] >= held[0]["since"] + 59
        assert held[0]["connection"] != held[1]["connection"] is not None
        first.lease("printers", "test_a", ttl=60)  # a renewal keeps the age
        assert broker.holdings()[0]["since"] == pytest.approx(held[0]["since"], abs=0.01)
        second.close()  # the holder went away: its lease with it
        deadline = time.monotonic() + 5
        while len(broker.holdings()) > 1 and time.monotonic() < deadline:
            time.sleep(0.005)  # the broker sees the close on its own thread
        assert [h["holder"] for h in broker.holdings()] == ["test_a"]
        first.release("test_a")
        assert broker.holdings() == []
        first.close()
    assert broker.holdings() == []  # stopped
