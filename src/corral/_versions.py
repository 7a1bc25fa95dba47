"""The lowest version corral supports of each package it integrates with, and the check
that turns an older installed one into one line. pyproject.toml's lower bounds and
``.ci/constraints-lowest.txt`` repeat this table (``tests/test_versions.py`` checks that
the three agree); the floors of the other extras and of the test suite's tools are
pyproject's alone, which the constraints file pins (checked there too).

The plugin runs with an older pytest and pytest-asyncio (``FLOORS``) than corral's own
test suite needs (``SUITE_FLOORS``, pyproject's ``[dev]`` bounds): apps pin them, and
below ``ASYNCIO_GLUE`` the plugin leaves out what it cannot do there, saying so.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re

__all__ = [
    "ASYNCIO_GLUE",
    "FLOORS",
    "SUITE_FLOORS",
    "check_floors",
    "installed",
    "release",
    "too_old",
]

#: What corral integrates with when it is installed: an older one is a usage error.
FLOORS: dict[str, str] = {
    "pytest": "8.0.0",
    "pytest-asyncio": "0.21.0",
    "pytest-xdist": "3.5.0",
    "anyio": "4.0.0",
    "sqlalchemy": "2.0.25",
    "psycopg": "3.1.20",
    "psycopg-pool": "3.2.0",
    "asyncpg": "0.27.0",
    "redis": "5.0.0",
}

#: The test suite's own floors of the packages above whose plugin floor is lower
#: (pyproject's ``[dev]`` bounds; the suite uses ``loop_scope`` and
#: ``asyncio_default_test_loop_scope``). tests/plugin/test_floors.py runs an app's suite
#: at the plugin's floors.
SUITE_FLOORS: dict[str, str] = {
    "pytest": "8.2.0",
    "pytest-asyncio": "0.26.0",
}

#: The pytest-asyncio from which the plugin's asyncio glue (corral._plugin._asyncio) works
#: whole: ``loop_scope`` (0.24), an async fixture's context carried into the test (0.25),
#: into a sync test's later fixtures (0.26). Below it the plugin opens a test's async
#: sandboxes from a sync fixture on ``event_loop`` (corral._plugin._asyncio_legacy).
ASYNCIO_GLUE = "0.26.0"


def release(version: str) -> tuple[int, ...]:
    """The release numbers of *version*, trailing zeros dropped so that ``"0.24"`` and
    ``"0.24.0"`` compare equal: ``"1.4.1.post1"`` -> ``(1, 4, 1)``."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        return ()
    numbers = [int(part) for part in match.group().split(".")]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


@functools.cache
def installed(name: str) -> str | None:
    """The installed version of distribution *name*, or ``None`` (looked up once per
    process: the controller's floors check, the glue choice and the glue's report line
    ask for the same distributions)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def too_old(name: str, floor: str) -> str | None:
    """The one-line complaint about an installed *name* older than *floor*, if it is."""
    version = installed(name)
    if version is None or release(version) >= release(floor):
        return None
    return f"corral: {name} {version} is too old (corral needs >= {floor})"


def check_floors() -> str | None:
    """One line about the installed packages below their floors, or ``None``."""
    messages = [m for name, floor in FLOORS.items() if (m := too_old(name, floor))]
    if not messages:
        return None
    return "; ".join([messages[0], *(m.removeprefix("corral: ") for m in messages[1:])])
