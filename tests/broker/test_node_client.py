"""A Node.js process, speaking PROTOCOL.md like the original client, uses the broker."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral.broker import Broker, Client
from tests._requires import require_binary

SCRIPT = Path(__file__).with_name("node_client.mjs")
PYTHON_BIG = {"from": "python", "text": "ü" * 4000, "list": list(range(100))}


def run_node(path: str, secret: str | None) -> dict[str, Any]:
    node = require_binary("node")
    args = [node, str(SCRIPT), path, *([secret] if secret else [])]
    done = subprocess.run(
        args, input=json.dumps(PYTHON_BIG), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.parametrize("secret", [None, "node-secret-é"], ids=["plain", "hmac-signed"])
def test_node_client_uses_the_broker(
    make_broker: Callable[..., Broker], secret: str | None
) -> None:
    broker = make_broker(secret=secret)  # require_ttl=True, like the Node broker's default
    with Client(broker.path, secret=secret) as py:
        py.set("python-big", PYTHON_BIG, ttl=60)
        report = run_node(broker.path, secret)
        assert report["ping"]["ok"] is True
        assert report["setPlain"] == {"ok": True}
        assert report["setCompressed"] == {"ok": True}
        assert report["pythonBig"] == {"value": report["expectedPythonBig"]}
        assert report["missing"] == {"error": "not_found"}
        assert set(report["list"]["items"]) == {"python-big", "node-plain", "node-big"}
        assert report["stats"]["stats"]["items"] == 3
        assert report["health"]["status"] == "healthy"
        assert report["metrics"]["format"] == "prometheus"
        assert report["lease"] == {"ok": True, "value": 0, "token": 1}  # + corral's fence
        assert report["release"] == {"ok": True, "released": True}
        assert report["noTtl"]["error"] == "ttl_required"
        assert py.get("node-plain") == {"from": "node", "n": 1}
        node_big = py.get("node-big")
        assert node_big["from"] == "node"
        assert len(node_big["rows"]) == 300
        assert node_big["rows"][7] == {"i": 7, "s": "ééééé"}


def test_node_client_with_the_wrong_secret_is_refused(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker(secret="right")
    report = run_node(broker.path, "wrong")
    assert report["ping"]["error"] == "auth_failed"
    assert report["setPlain"]["error"] == "auth_failed"


STUB = Path(__file__).with_name("node_broker_stub.mjs")


@pytest.mark.parametrize("secret", [None, "stub-secret"], ids=["plain", "hmac-signed"])
def test_python_client_talks_to_a_node_style_broker(tmp_path: Path, secret: str | None) -> None:
    node = require_binary("node")
    path = str(tmp_path / "node.sock")
    with subprocess.Popen(
        [node, str(STUB), path, *([secret] if secret else [])], stdout=subprocess.PIPE, text=True
    ) as stub:
        assert stub.stdout is not None
        assert stub.stdout.readline().strip() == "ready"
        try:
            with Client(path, secret=secret) as c:
                c.set("k", {"café": [1, 2.5, None]}, ttl=30)
                assert c.get("k") == {"café": [1, 2.5, None]}
                big = {"rows": ["x" * 50] * 100}
                c.set("big", big, ttl=30)  # compressed on the wire, as Node's client does
                assert c.get("big") == big
                assert c.ping() > 0
                assert c._handshake is not None
                assert c._handshake.legacy
            if secret:
                with Client(path, secret="wrong") as c, pytest.raises(PermissionError):
                    c.ping()
        finally:
            stub.terminate()
            stub.wait(timeout=10)
