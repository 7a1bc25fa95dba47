"""Use case 3: a run-wide rate limit on an external API.

The fake API refuses more than 10 requests in any second (HTTP 429). Every worker calls
``throttle`` before each request: the broker starts the calls of all workers together,
first come first served, one every 0.2 s. ``throttle(name, rate, per)`` allows *rate*
call starts in any *per* seconds, so ``rate=5, per=1.0`` would let 5 start at once;
``rate=1, per=0.2`` spaces them evenly, and 5 per second leaves the provider's limit
room for requests that arrive late (a busy machine, the network): no request is ever
refused, however many workers run.
"""

from __future__ import annotations

import fake_api
import pytest

SPACING = 0.2  # seconds between two requests of the whole run: 5 per second


@pytest.fixture(scope="session")
def api_key(corral, api_url: str) -> str:
    return corral.once("api-key", lambda: fake_api.call(api_url, "POST", "/keys")[1]["key"])


@pytest.mark.parametrize("n", range(16))
def test_quote_never_hits_the_rate_limit(corral, api_key: str, api_url: str, n: int) -> None:
    corral.throttle("quotes-api", rate=1, per=SPACING, timeout=60)
    status, body = fake_api.call(api_url, "GET", f"/quote?sku=SKU-{n}", api_key=api_key)
    assert status == 200, body
