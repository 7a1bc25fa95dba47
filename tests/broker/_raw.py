"""A raw NDJSON socket for tests that must speak the wire protocol byte by byte."""

from __future__ import annotations

import json
import socket
from typing import Any


class Raw:
    """One Unix-socket connection that writes lines and reads JSON answers."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, *objs: dict[str, Any] | bytes) -> None:
        data = b"".join(o if isinstance(o, bytes) else json.dumps(o).encode() + b"\n" for o in objs)
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buf[:100]!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, obj: dict[str, Any] | bytes) -> dict[str, Any]:
        self.send(obj)
        return self.recv()

    def at_eof(self) -> bool:
        """True when the broker closed the connection (after any buffered answers)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
