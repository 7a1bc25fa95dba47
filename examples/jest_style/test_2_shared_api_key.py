"""Use case 2: one API key for the whole run, created by whichever worker asks first.

``once`` runs the creation exactly once across all workers; the others wait for it and
get the same value. Had the creating worker died, another would have been elected.
"""

from __future__ import annotations

import fake_api
import pytest


@pytest.fixture(scope="session")
def api_key(corral, api_url: str) -> str:
    def mint() -> str:
        status, body = fake_api.call(api_url, "POST", "/keys")
        assert status == 201, body
        return str(body["key"])

    return corral.once("api-key", mint, ttl=3600, timeout=60)


@pytest.mark.parametrize("sku", ["MUG", "TEE", "CAP", "PEN", "PAD"])
def test_every_worker_uses_the_one_key(api_key: str, api_url: str, corral, sku: str) -> None:
    corral.throttle("quotes-api", rate=1, per=0.2, timeout=60)  # use case 3's limit
    status, body = fake_api.call(api_url, "GET", f"/quote?sku={sku}", api_key=api_key)
    assert status == 200, body
    assert body["sku"] == sku
    status, stats = fake_api.call(api_url, "GET", "/stats")
    assert stats["keys_minted"] == 1
