"""Global set-up (Jest's globalSetup): start the fake external API once, in the controller.

corral's plugin has started the run's broker before this runs and every worker reaches
it through ``EPHEMERAL_PIPE``; the ``corral`` fixture is a client of it. The fake API and
a scratch directory are made here, in the controlling process only, and handed to the
workers through the environment, exactly like ``EPHEMERAL_PIPE`` itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from http.server import ThreadingHTTPServer

import fake_api
import pytest

from corral import Client

_server: ThreadingHTTPServer | None = None
_scratch: str | None = None
_api = fake_api.FakeApi(limit=10, window=1.0)


def pytest_configure(config: pytest.Config) -> None:
    global _server, _scratch
    if hasattr(config, "workerinput"):  # an xdist worker: the controller did this already
        return
    _server = fake_api.serve(_api)
    _scratch = tempfile.mkdtemp(prefix="jest-style-")
    os.environ["FAKE_API_URL"] = f"http://127.0.0.1:{_server.server_address[1]}"
    os.environ["JEST_STYLE_DATA"] = _scratch


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _server is None:
        return
    stats = _api.stats()
    lines = [
        f"fake API: {stats['keys_minted']} key(s) minted, {stats['served']} served, "
        f"{stats['refused']} refused; busiest 1 s window: {stats['busiest_window']} requests "
        f"(limit {stats['limit']})",
    ]
    try:
        with Client(timeout=2) as client:
            total = client.get("primes-total", default=None)
            builds = client.get("price-table-builds", default=0)
        lines.append(f"price table built {builds} time(s); primes below 100000: {total}")
    except Exception as exc:  # the summary must never fail the run
        lines.append(f"broker not reachable for the summary: {exc}")
    terminalreporter.write_sep("-", "jest_style")
    for line in lines:
        terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _server, _scratch
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None
    if _scratch is not None:
        shutil.rmtree(_scratch, ignore_errors=True)
        _scratch = None


@pytest.fixture(scope="session")
def api_url() -> str:
    return os.environ["FAKE_API_URL"]
