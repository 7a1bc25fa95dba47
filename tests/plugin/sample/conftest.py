"""The sample suite's conftest: imports the app at import time (its URL must be set)."""

from __future__ import annotations

import json
import os
import random
from importlib.metadata import version

import app  # type: ignore[import-not-found]  # noqa: F401 - reads DATABASE_URL at import
import pytest


def _server_dir() -> str | None:
    """The run directory of the server behind PGHOST:PGPORT, when it is on this machine."""
    from corral._plugin._colocate import postmaster_pid

    pid = postmaster_pid({"host": os.environ.get("PGHOST"), "port": os.environ.get("PGPORT")})
    if pid is None:
        return None
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    return os.path.dirname(argv[argv.index("-D") + 1])


def pytest_configure(config: pytest.Config) -> None:
    if int(version("pytest-asyncio").split(".")[0]) < 1:
        # pytest-asyncio < 1.0 leaves an event loop unclosed when an anyio test follows its
        # asyncio tests (seen without corral: 0.26 with anyio 4.0); its self-pipe sockets
        # are collected during some later test, which filterwarnings=error fails depending
        # on the random order. Not corral's: ignored at those versions only.
        config.addinivalue_line("filterwarnings", "ignore:unclosed event loop:ResourceWarning")
        config.addinivalue_line(
            "filterwarnings", r"ignore:unclosed <socket.socket fd=\d+, family=1:ResourceWarning"
        )
    facts = os.environ.get("SAMPLE_FACTS")
    if facts and not hasattr(config, "workerinput"):
        with open(facts, "w") as f:
            json.dump(
                {
                    "pipe": os.environ.get("EPHEMERAL_PIPE"),
                    "url": os.environ.get("CORRAL_DATABASE_URL"),
                    "pid": os.getpid(),
                    "template": json.loads(os.environ["CORRAL_PLUGIN_RUN"])["template"],
                    "server_dir": _server_dir(),
                },
                f,
            )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seed = os.environ.get("SAMPLE_SHUFFLE")
    if seed:
        random.Random(int(seed)).shuffle(items)
