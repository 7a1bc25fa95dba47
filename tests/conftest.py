"""Test-suite wide fixtures: plugin modules named ``tests/fix_*.py``."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Co-location's machine-wide CPU claims (corral._plugin._cpuclaim): the inner runs of this
# suite claim in a directory of their own, so they neither take CPUs from corral runs
# elsewhere on the machine nor lose co-location to them (which would fail their checks).
os.environ["CORRAL_CPU_CLAIMS"] = _CLAIMS = tempfile.mkdtemp(prefix="corral-test-cpu-claims-")
atexit.register(shutil.rmtree, _CLAIMS, ignore_errors=True)

pytest_plugins = ["tests.fix_broker", "tests.fix_postgres", "tests.fix_redis", "tests.fix_sandbox"]
