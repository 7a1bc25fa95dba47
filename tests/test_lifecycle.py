"""``with`` and ``async with`` of corral's clients and servers (corral._lifecycle)."""

from __future__ import annotations

import asyncio
import threading

from corral._lifecycle import AsyncClosing, Closing, Running


class _Server(Running):
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def start(self) -> str:
        self.calls.append(("start", threading.current_thread() is threading.main_thread()))
        return "address"

    def stop(self) -> None:
        self.calls.append(("stop", threading.current_thread() is threading.main_thread()))


def test_with_starts_and_stops_a_server_even_on_an_error() -> None:
    server = _Server()
    try:
        with server as entered:
            assert entered is server
            assert server.calls == [("start", True)]
            raise KeyError("boom")
    except KeyError:
        pass
    assert server.calls == [("start", True), ("stop", True)]


def test_async_with_starts_and_stops_a_server_off_the_event_loop() -> None:
    server = _Server()

    async def main() -> None:
        async with server as entered:
            assert entered is server

    asyncio.run(main())
    # on a worker thread: a blocking start must not stall the loop that may serve it
    assert server.calls == [("start", False), ("stop", False)]


def test_a_client_is_closed_on_the_way_out() -> None:
    closed: list[str] = []

    class Client(Closing):
        def close(self) -> None:
            closed.append("close")

    class AsyncClient(AsyncClosing):
        async def aclose(self) -> None:
            closed.append("aclose")

    with Client() as client:
        assert isinstance(client, Client)

    async def main() -> None:
        async with AsyncClient() as aclient:
            assert isinstance(aclient, AsyncClient)

    asyncio.run(main())
    assert closed == ["close", "aclose"]
