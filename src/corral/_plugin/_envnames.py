"""The environment variables the plugin and the schema step share, without the code
that fills them (``_dbenv``): a run without a database reads these names only."""

from __future__ import annotations

__all__ = ["ENV_SANDBOX_MODE", "URL_VARIABLE"]

#: The variable that always holds a test process's (or the schema step's) whole URL.
URL_VARIABLE = "CORRAL_DATABASE_URL"
#: Read by ``corral.sandbox.sandbox()`` when no mode is given; the plugin sets "sandbox"
#: in test processes, "normal" in the schema step's.
ENV_SANDBOX_MODE = "CORRAL_SANDBOX_MODE"
