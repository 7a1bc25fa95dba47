"""What every driver's connection proxy keeps, whatever the driver: its sandbox, whether
it is closed or handed back, and the checks before each use. No I/O here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Protocol, TypeVar

from corral.errors import SandboxError
from corral.sandbox._plan import AppState, Plan

__all__ = ["ProxyBase", "ProxyBox"]


class _Releasable(Protocol):
    def release(self, app: AppState | None = None) -> None: ...
    def adopt(self, app: AppState) -> None: ...


class ProxyBox(Protocol):
    """The part of a driver's box a proxy uses (each adapter's ``_Box``)."""

    @property
    def plan(self) -> Plan: ...
    @property
    def closed(self) -> bool: ...
    @property
    def broken(self) -> BaseException | None: ...
    @property
    def real(self) -> Any: ...
    @property
    def lock(self) -> _Releasable: ...
    @property
    def controller(self) -> Any: ...
    def track(self, proxy: Any) -> None: ...
    def check(self) -> None: ...


BoxT = TypeVar("BoxT", bound=ProxyBox)


class ProxyBase(Generic[BoxT]):
    """A checkout of a sandbox's one connection, as the application holds it.

    ``pooled`` proxies go back through the handle (``putconn``/``release``); the others
    (a factory's ``connect()``) hand the connection on when closed.
    """

    #: how the app gets another connection, for the "sandbox is closed" message
    _get_another: ClassVar[str] = "get a new"

    def __init__(self, box: BoxT, app: AppState, *, pooled: bool) -> None:
        self._box = box
        self._real = box.real
        self._app = app
        self._pooled = pooled
        self._closed = False
        self._returned = False
        #: how long a statement waits for its turn on the connection
        self._timeout: float | None = box.controller.checkout_timeout
        box.track(self)
        box.lock.adopt(app)  # the checkout's turn: its transaction state decides lending

    def _closed_error(self) -> Exception:
        """The driver's error for using a connection the app closed."""
        raise NotImplementedError

    def _detach(self) -> None:
        self._closed = True

    def _usable(self) -> None:
        if self._closed:
            if self._box.closed and not self._returned:
                raise SandboxError(
                    f"this connection belonged to a sandbox that is now closed; "
                    f"{self._get_another} connection inside the current sandbox"
                )
            raise self._closed_error()
        self._box.check()

    @property
    def closed(self) -> bool:
        return self._closed or self._box.closed

    def _open_work(self) -> bool:
        """Whether the app left a transaction open that returning/closing must roll back."""
        return not self.closed and bool(self._app.frames) and self._box.broken is None

    def _closed_now(self) -> None:
        """The app closed this proxy: a factory's connection goes to its next user."""
        self._closed = True
        if not self._pooled:
            self._checkin()

    def _checkin(self) -> None:
        if not self._returned:
            self._returned = True
            self._closed = True
            if not self._box.closed:
                self._box.lock.release(self._app)
