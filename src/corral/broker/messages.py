"""Events and instructions exchanged with the sans-IO protocol objects (no I/O here).

Events are plain slotted dataclasses, not frozen ones: one is built per request, and a
frozen dataclass's ``__init__`` costs several times more. Treat them as read-only.

Server side: :class:`ServerConnection` turns bytes into :class:`Request`, :class:`Rejected`
and :class:`TooLarge` events. Client side: flows yield :class:`Call` and receive dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

#: JSON object as the protocol sees it.
Message = dict[str, Any]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_event()`` needs more bytes before it can produce an event.
NEED_DATA: Final = _Sentinel("NEED_DATA")
#: The peer closed its side (``receive_data(b"")``) and every buffered line was consumed.
CLOSED: Final = _Sentinel("CLOSED")


@dataclass(slots=True)
class Request:
    """One request line, parsed: ``obj`` is the JSON object, ``raw`` the bytes received.

    ``raw`` is kept because Node-style ``hmac`` is verified over the bytes as they came.
    """

    obj: Message
    raw: bytes


@dataclass(slots=True)
class Rejected:
    """A line that is not a JSON object: answer ``{"ok": false, "error": code}``, go on."""

    code: str
    detail: str


@dataclass(slots=True)
class TooLarge:
    """A line over ``max_request_size``: answer ``too_large`` and close the connection."""

    size: int
    limit: int


@dataclass(slots=True)
class Response:
    """One response line from the broker, parsed (client side)."""

    obj: Message


ServerEvent = Request | Rejected | TooLarge
ClientEvent = Response


@dataclass(slots=True)
class Call:
    """What a client flow yields: send ``request`` and resume me with the response.

    :param request: the JSON object to send.
    :param timeout: how long to wait for the answer, in seconds; ``None`` means the
        client's own timeout. Waiting operations (locks, pools) pass their own.
    :param key: the key or name the request is about, for error messages.
    :param wait: the broker may hold the answer (a lock, a pool item, a barrier...):
        the client waits ``timeout`` plus its own timeout, or forever when ``timeout``
        is None, because the broker itself answers ``timeout`` when the wait is over.
    :param wakes: the request may wake another process that waits (an unlock, a
        released pool item, a published ``once`` value, a push): its sender does not
        busy-poll for the answer, so the woken process gets the CPU.
    """

    request: Message
    timeout: float | None = None
    key: str | None = None
    wait: bool = False
    wakes: bool = False


@dataclass(slots=True)
class Compute:
    """What the ``once`` flow yields to have the client call the user's ``compute()``.

    The flow is resumed with the result (awaited when it is awaitable, by the asyncio
    client), or the exception ``compute()`` raised is thrown into it.
    """


#: The one :class:`Compute` instruction.
COMPUTE: Final = Compute()
