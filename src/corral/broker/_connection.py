"""One broker connection: bytes in, answers out, strictly in order, with backpressure.

Parsing and meaning live in the sans-IO protocol and :class:`~corral.broker._core.Core`;
this class only pumps bytes between them and the asyncio transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final, Protocol

from corral.broker._coord import describe
from corral.broker._core import Core, Session
from corral.broker._spin import SpinningSelector, peer_in_other_process
from corral.broker._store import Ticket
from corral.broker.messages import Rejected, Request, TooLarge
from corral.broker.protocol import ServerConnection

__all__ = ["Connection", "Host"]

log = logging.getLogger("corral.broker")

_FLUSH_AT: Final = 256 * 1024  # stop answering a pipelined batch once this much is queued
_READ_SIZE: Final = 64 * 1024
# Bytes a client may pipeline behind a request that waits before reading pauses.
_HELD_LIMIT: Final = 1024 * 1024
_encode = ServerConnection.send


def _encode_answer(answer: dict[str, object], session: int) -> bytes:
    """*answer* as a line; if it cannot be written, an ``internal_error`` line instead.

    Values are checked at the door (``invalid_value``), so this is a safety net: a
    waiter (pop, once, lock...) always hears something, never silence.
    """
    try:
        return _encode(answer)
    except Exception as exc:
        log.exception("session %d: an answer could not be encoded", session)
        detail = f"the answer could not be encoded: {type(exc).__name__}: {exc}"
        return _encode({"ok": False, "error": "internal_error", "detail": detail[:500]})


class Host(Protocol):
    """What a connection needs of the server that accepted it (the
    :class:`~corral.broker.server.Broker`), declared here so this module does not import
    the server that imports it."""

    max_request_size: int
    idle_timeout: float | None
    debug: bool
    _connections: dict[int, Connection]
    _selector: SpinningSelector | None
    _next_session: int
    _last_activity: float

    def _core_or_raise(self) -> Core: ...
    def _after_batch(self) -> None: ...


class Connection(asyncio.BufferedProtocol):
    """One client connection: strict in-order answers, backpressure, ownership.

    A buffered protocol: the transport reads into one preallocated buffer per
    connection, instead of allocating (and freeing) 256 KiB per read, which costs more
    than handling a small request.
    """

    def __init__(self, broker: Host) -> None:
        self.broker = broker
        self.core = broker._core_or_raise()
        self.proto = ServerConnection(broker.max_request_size)
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.local_fd = -1
        # A request that waits (a Ticket): the requests behind it run after it, in order,
        # as Redis blocks a connection on BLPOP. Reading goes on so a disconnect is seen
        # at once (the ticket dies with its connection).
        self.waiting: Ticket | None = None
        self.paused = False  # the peer does not read our answers
        self.held = False  # reading paused: too much pipelined behind a waiting request
        self.finished = False
        self.view = memoryview(bytearray(_READ_SIZE))

    # asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        broker = self.broker
        broker._next_session += 1
        self.session = Session(broker._next_session, time.time())
        broker._connections[self.session.id] = self
        self.core.sessions[self.session.id] = self.session
        sock = transport.get_extra_info("socket")
        self.local_fd = -1
        selector = broker._selector
        if selector is not None and sock is not None and not peer_in_other_process(sock):
            self.local_fd = sock.fileno()  # never spin for a client in this process
            selector.local.add(self.local_fd)
        if self.core.draining:
            transport.write(_encode({"ok": False, "error": "draining"}))
            transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self.proto.receive_data(data)
        if self.broker.idle_timeout is not None:
            self.broker._last_activity = time.monotonic()
        if self.waiting is not None:
            if self.proto.buffered_bytes > _HELD_LIMIT and not self.held:
                self.held = True
                if self.transport is not None:
                    self.transport.pause_reading()
        elif not self.paused:
            self._process()

    def eof_received(self) -> bool:
        # Answer what was already received, then close: ``printf '...\n' | nc -U`` works.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.finished = True
        broker = self.broker
        session = self.session
        if session is None:
            return
        broker._connections.pop(session.id, None)
        if broker._selector is not None:
            broker._selector.local.discard(self.local_fd)
        self.core.sessions.pop(session.id, None)
        broker._last_activity = time.monotonic()  # idle_timeout counts from the last close
        reason = f"member {describe(session.who())} disconnected (it exited or died)"
        store = self.core.store
        if self.waiting is not None:
            store.cancel(self.waiting, reason)  # never granted; a barrier breaks
            self.waiting = None
        if session.persistent:
            freed = store.release_owner(session.id, reason)
            if freed:
                log.debug("session %d closed: released %d holdings", session.id, freed)
        broker._after_batch()

    def pause_writing(self) -> None:
        # The peer does not read: stop reading its requests so we stop producing answers.
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.finished and not self.held:
            self.transport.resume_reading()
            if self.waiting is None:
                self._process()

    # request pump ----------------------------------------------------------------

    def _process(self) -> None:
        proto, core, session = self.proto, self.core, self.session
        transport = self.transport
        assert session is not None
        assert transport is not None
        out: list[bytes] = []
        size = 0
        debug = self.broker.debug
        while True:
            event = proto.next_event()
            kind = type(event)
            if kind is Request:
                assert isinstance(event, Request)
                if debug:  # action and key only: requests may carry a proof or an hmac
                    log.debug(
                        "session %d: %s %r",
                        session.id,
                        event.obj.get("action"),
                        event.obj.get("key"),
                    )
                try:
                    response = core.handle(session, event)
                    if type(response) is not dict:
                        assert isinstance(response, Ticket)
                        response.on_done = self._ticket_done
                        self.waiting = response
                        break  # the rest waits for it: strictly in order
                    line = _encode_answer(response, session.id)
                except Exception as exc:  # a bug must cost one answer, never the broker
                    log.exception("session %d: request failed", session.id)
                    line = _encode({"ok": False, "error": "internal_error", "detail": repr(exc)})
            elif kind is Rejected:
                assert isinstance(event, Rejected)
                line = _encode({"ok": False, "error": event.code, "detail": event.detail})
            elif kind is TooLarge:
                assert isinstance(event, TooLarge)
                detail = f"request line over max_request_size={event.limit} bytes"
                out.append(_encode({"ok": False, "error": "too_large", "detail": detail}))
                transport.write(b"".join(out))
                log.debug("session %d: request over %d bytes, closing", session.id, event.limit)
                transport.close()
                self.broker._after_batch()
                return
            else:  # NEED_DATA or CLOSED
                break
            out.append(line)
            size += len(line)
            if size >= _FLUSH_AT:
                transport.write(b"".join(out))
                out.clear()
                size = 0
                if self.paused:  # pause_writing ran inside write(): resume later
                    break
            if not proto.has_buffered:
                break  # the usual case, one request per read: skip asking for NEED_DATA
        if out:
            transport.write(b"".join(out) if len(out) > 1 else out[0])
        self.broker._after_batch()

    def _ticket_done(self, ticket: Ticket) -> None:
        """The waiting request was decided: answer it, then run what queued behind it.

        Called from inside whatever decided the ticket (another connection's request,
        a timer), so the queued requests run on the next loop turn, not re-entrantly.
        """
        if ticket is not self.waiting:
            return
        self.waiting = None
        transport = self.transport
        if transport is None or self.finished:
            return
        assert ticket.result is not None
        assert self.session is not None
        # Called from inside another request's handler: this must never raise, or the
        # waiter would go unanswered and that request fail halfway.
        transport.write(_encode_answer(ticket.result, self.session.id))
        selector = self.broker._selector
        if selector is not None:
            selector.stand_down()  # the waiter we just woke needs a CPU, not our polling
        if self.held:
            self.held = False
            if not self.paused:
                transport.resume_reading()
        asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        if not (self.finished or self.paused or self.waiting is not None):
            self._process()
