"""Options, ini keys and environment variables of the plugin, resolved into one Settings.

Works on the early config (before conftest files are imported), because a worker's
database URL must be in the environment before the application's modules are.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ENV_DATABASE_URL",
    "ENV_DSN",
    "ENV_RUN",
    "ENV_SANDBOX_MODE",
    "Settings",
    "add_options",
    "load_schema_callable",
]

#: An admin DSN of a PostgreSQL server the user runs (else corral starts a throwaway one).
ENV_DSN = "CORRAL_DSN"
#: Each test process's own database, exported before collection.
ENV_DATABASE_URL = "CORRAL_DATABASE_URL"
#: Read by ``corral.sandbox.sandbox()`` when no mode is given; the plugin sets "sandbox".
ENV_SANDBOX_MODE = "CORRAL_SANDBOX_MODE"
#: What the controlling process hands to its xdist workers (JSON; internal).
ENV_RUN = "CORRAL_PLUGIN_RUN"

_SWITCH = ("auto", "on", "off")


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("corral", "corral: run-scoped broker and database sandboxes")
    group.addoption(
        "--corral-dsn",
        dest="corral_dsn",
        default=None,
        metavar="DSN",
        help="admin DSN of the PostgreSQL server to use (ini corral_dsn, env CORRAL_DSN); "
        "default: a throwaway server from the local PostgreSQL binaries",
    )
    group.addoption(
        "--corral-database",
        dest="corral_database",
        default=None,
        choices=_SWITCH,
        help="give each test process its own database: auto (when a schema or a DSN is "
        "configured), on, off (ini corral_database)",
    )
    group.addoption(
        "--corral-no-sandbox",
        dest="corral_no_sandbox",
        action="store_true",
        default=False,
        help="do not open sandboxes around tests (ini corral_sandbox = false)",
    )
    parser.addini("corral_dsn", "admin DSN of the PostgreSQL server to use", default="")
    parser.addini(
        "corral_schema",
        "SQL files/directories (relative to the rootdir), or one module:function "
        "called with a DSN, that build the template database",
        type="linelist",
        default=[],
    )
    parser.addini(
        "corral_schema_watch",
        "more files/directories whose contents key the template (e.g. migrations/)",
        type="linelist",
        default=[],
    )
    parser.addini(
        "corral_database_env",
        "more environment variables that get each process's database URL (DATABASE_URL)",
        type="args",
        default=[],
    )
    parser.addini("corral_database", "auto, on or off (see --corral-database)", default="auto")
    parser.addini(
        "corral_sandbox",
        "open a sandbox around every test (default true)",
        type="bool",
        default=True,
    )


@dataclass(frozen=True)
class Settings:
    """Everything the plugin reads from options, ini and environment, validated once.

    :ivar dsn: the user's admin DSN, or None for corral's throwaway server.
    :ivar schema: SQL paths (absolute) or ``"module:function"`` entries.
    :ivar database: whether each process gets its own database.
    """

    dsn: str | None
    schema: tuple[str, ...]
    watch: tuple[Path, ...]
    database_env: tuple[str, ...]
    database: bool
    sandbox: bool
    rootpath: Path
    extra_paths: tuple[Path, ...] = field(default=())

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        """Resolve from *config*; works on the early config too (known args only).

        :raises pytest.UsageError: a value is malformed.
        """
        option = _option(config, "corral_dsn")
        dsn = option or str(config.getini("corral_dsn")).strip() or os.environ.get(ENV_DSN) or None
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        schema = tuple(_schema_entry(str(line), base) for line in config.getini("corral_schema"))
        if len([s for s in schema if _is_callable_ref(s)]) and len(schema) > 1:
            raise pytest.UsageError(
                "corral_schema: give either SQL files/directories or one module:function "
                f"(got {list(schema)}); a migration function can run SQL files itself"
            )
        watch = tuple(base / str(p) for p in config.getini("corral_schema_watch"))
        env_names = tuple(str(n) for n in config.getini("corral_database_env"))
        for name in env_names:
            if not name.isidentifier():
                raise pytest.UsageError(f"corral_database_env: {name!r} is not a variable name")
        switch = (
            _option(config, "corral_database")
            or str(config.getini("corral_database")).strip().lower()
            or "auto"
        )
        if switch not in _SWITCH:
            raise pytest.UsageError(f"corral_database must be auto, on or off, not {switch!r}")
        database = bool(schema or dsn or env_names) if switch == "auto" else switch == "on"
        sandbox = bool(config.getini("corral_sandbox")) and not _option(config, "corral_no_sandbox")
        extra = tuple(dict.fromkeys([base, config.rootpath]))
        return cls(dsn, schema, watch, env_names, database, sandbox, config.rootpath, extra)

    def schema_source(self) -> Sequence[str] | Callable[[str], Any]:
        """What :func:`corral.postgres.ensure_template` takes: paths, or the callable.

        :raises pytest.UsageError: the ``module:function`` cannot be imported.
        """
        if len(self.schema) == 1 and _is_callable_ref(self.schema[0]):
            return load_schema_callable(self.schema[0], self.extra_paths)
        if not self.schema:
            return empty_schema  # corral_database = on without a schema: empty clones
        return list(self.schema)


def empty_schema(dsn: str) -> None:
    """The schema of ``corral_database = on`` without ``corral_schema``: nothing."""


def _option(config: pytest.Config, name: str) -> Any:
    # Before the full parse (pytest_load_initial_conftests) only the known args exist.
    value = getattr(config.option, name, None)
    if value is None:
        known = getattr(config, "known_args_namespace", None)
        value = getattr(known, name, None)
    return value


def _is_callable_ref(entry: str) -> bool:
    if entry.endswith(".sql") or "/" in entry or os.sep in entry or ":" not in entry:
        return False
    module, _, func = entry.partition(":")
    return all(part.isidentifier() for part in module.split(".")) and func.isidentifier()


def _schema_entry(line: str, base: Path) -> str:
    line = line.strip()
    if _is_callable_ref(line):
        return line
    path = (base / line).resolve()
    if not path.exists():
        raise pytest.UsageError(
            f"corral_schema: {line!r} does not exist (looked at {path}); paths are "
            "relative to the directory of the ini file"
        )
    return str(path)


def load_schema_callable(ref: str, extra_paths: Sequence[Path] = ()) -> Callable[[str], Any]:
    """Import ``module:function``; the rootdir is importable, as for conftest files.

    :raises pytest.UsageError: the module or the function is missing.
    """
    module_name, _, func_name = ref.partition(":")
    # Like a rootdir conftest.py under pytest's default import mode, the ini file's
    # directory becomes importable (and stays so: the function may import lazily).
    sys.path[:0] = [str(p) for p in extra_paths if str(p) not in sys.path]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise pytest.UsageError(f"corral_schema: cannot import {module_name!r}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise pytest.UsageError(f"corral_schema: {module_name} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]
