"""The plugin's warning classes, importable without the sandbox machinery that emits them."""

from __future__ import annotations

import pytest

__all__ = ["WrongDatabaseWarning"]


class WrongDatabaseWarning(pytest.PytestWarning):
    """A sandboxed handle is connected to another database than its test process's.

    Its queries miss the database corral built from the schema (and what they write is
    rolled back all the same). Filter it (``ignore::corral.pytest_plugin.WrongDatabaseWarning``)
    for a handle that is meant to reach another database.
    """
