"""Test-suite wide fixtures: plugin modules named ``tests/fix_*.py``."""

from __future__ import annotations

pytest_plugins = ["tests.fix_broker", "tests.fix_postgres", "tests.fix_redis", "tests.fix_sandbox"]
