"""A local stand-in for an external HTTP API with API keys and a rate limit.

``POST /keys`` mints an API key (as a real provider's slow, quota-limited key creation
would); ``GET /quote?sku=...`` needs ``X-Api-Key`` and answers 429 when more than
``limit`` requests arrived within any ``window`` seconds; ``GET /stats`` tells how many
keys were minted, how many requests were served and refused, and the busiest window.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class FakeApi:
    """The service's state; thread-safe (the HTTP server answers on threads)."""

    def __init__(self, limit: int = 10, window: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()
        self.keys: list[str] = []
        self.served = 0
        self.refused = 0
        self.busiest = 0

    def mint(self) -> str:
        with self._lock:
            key = f"key-{len(self.keys) + 1}"
            self.keys.append(key)
            return key

    def admit(self) -> bool:
        """Count a request in the sliding window; False when over the limit."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0] >= self.window:
                self._recent.popleft()
            if len(self._recent) >= self.limit:
                self.refused += 1
                return False
            self._recent.append(now)
            self.served += 1
            self.busiest = max(self.busiest, len(self._recent))
            return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "keys_minted": len(self.keys),
                "served": self.served,
                "refused": self.refused,
                "busiest_window": self.busiest,
                "limit": self.limit,
            }


def serve(api: FakeApi) -> ThreadingHTTPServer:
    """Start the API on a free localhost port, on a daemon thread; ``shutdown()`` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if self.path != "/keys":
                self._reply(404, {"error": "not found"})
                return
            time.sleep(0.3)  # key creation is slow (and quota-limited) at real providers
            self._reply(201, {"key": api.mint()})

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/stats":
                self._reply(200, api.stats())
            elif url.path != "/quote":
                self._reply(404, {"error": "not found"})
            elif self.headers.get("X-Api-Key") not in api.keys:
                self._reply(401, {"error": "bad api key"})
            elif not api.admit():
                self._reply(429, {"error": "rate limit exceeded"})
            else:
                sku = parse_qs(url.query).get("sku", ["?"])[0]
                self._reply(200, {"sku": sku, "price_cents": 100 + sum(map(ord, sku)) % 900})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fake-api", daemon=True).start()
    return server


def call(base_url: str, method: str, path: str, api_key: str | None = None) -> tuple[int, Any]:
    """One request to the fake API; ``(status, decoded JSON body)``."""
    request = urllib.request.Request(base_url + path, method=method)
    if api_key is not None:
        request.add_header("X-Api-Key", api_key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)
