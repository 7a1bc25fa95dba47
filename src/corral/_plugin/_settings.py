"""Options, ini keys and environment variables of the plugin, resolved into one Settings.

Works on the early config (before conftest files are imported), because a worker's
database URL must be in the environment before the application's modules are.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The names only: the code that renders the variables is for runs with a database.
from corral._plugin._envnames import ENV_SANDBOX_MODE, URL_VARIABLE

__all__ = [
    "ENV_BROKER_URL",
    "ENV_COLOCATE",
    "ENV_DATABASE_URL",
    "ENV_DSN",
    "ENV_GC_FREEZE",
    "ENV_HOST",
    "ENV_MACHINES",
    "ENV_RUN",
    "ENV_RUN_ID",
    "ENV_SANDBOX_MODE",
    "ENV_SHARD",
    "Settings",
    "add_options",
    "parse_shard",
]

#: An admin DSN of a PostgreSQL server the user runs (else corral starts a throwaway one).
ENV_DSN = "CORRAL_DSN"
#: Each test process's own database, exported before collection.
ENV_DATABASE_URL = URL_VARIABLE
#: What the controlling process hands to its xdist workers (JSON; internal).
ENV_RUN = "CORRAL_PLUGIN_RUN"
#: A Redis URL: the run's broker is Redis, shared by every machine of the run.
ENV_BROKER_URL = "CORRAL_BROKER_URL"
#: The run's name, the same on every machine of a multi-machine run.
ENV_RUN_ID = "CORRAL_RUN_ID"
#: How many pytest invocations share a Redis run (the last one out deletes its keys).
ENV_MACHINES = "CORRAL_MACHINES"
#: This machine's name in a multi-machine run (default: the host name).
ENV_HOST = "CORRAL_HOST"
#: ``K/N``: run only the K-th of N shards of the suite (by a hash of each node id).
ENV_SHARD = "CORRAL_SHARD"
#: ``auto``, ``on`` or ``off``: pin each test process and its backends to one CPU.
ENV_COLOCATE = "CORRAL_COLOCATE"
#: ``auto``, ``on`` or ``off``: gc.freeze() each test process once its tests are collected.
ENV_GC_FREEZE = "CORRAL_GC_FREEZE"

_SWITCH = ("auto", "on", "off")
_SCHEMA_TIMEOUT = 600.0
# Stricter than the Redis client's 128: the id also goes into database names (63 bytes).
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
        help="give each test process its own database: auto (when a schema, or a DSN "
        "outside a Django project, is configured), on, off (ini corral_database)",
    )
    group.addoption(
        "--corral-no-sandbox",
        dest="corral_no_sandbox",
        action="store_true",
        default=False,
        help="do not open sandboxes around tests (ini corral_sandbox = false)",
    )
    group.addoption(
        "--corral-colocate",
        dest="corral_colocate",
        default=None,
        choices=_SWITCH,
        help="opt-in: pin each test process (and all it starts) and its database backends "
        "to one CPU of their own: auto (when the server is local and each process can have "
        "a CPU), on, off (the default; ini corral_colocate, env CORRAL_COLOCATE)",
    )
    group.addoption(
        "--corral-gc-freeze",
        dest="corral_gc_freeze",
        default=None,
        choices=_SWITCH,
        help="opt-in: gc.freeze() each test process once its tests are collected, so the "
        "garbage collector skips what lives all run: auto (when corral gives processes "
        "databases), on, off (the default; ini corral_gc_freeze, env CORRAL_GC_FREEZE)",
    )
    group.addoption(
        "--corral-broker",
        dest="corral_broker",
        default=None,
        metavar="URL",
        help="a Redis URL (redis://, rediss://, unix://) to coordinate through instead of a "
        "local broker, so pytest runs on several machines share one run (ini corral_broker, "
        "env CORRAL_BROKER_URL)",
    )
    group.addoption(
        "--corral-run-id",
        dest="corral_run_id",
        default=None,
        metavar="ID",
        help="the run's name, the same on every machine of the run, e.g. the CI pipeline id "
        "(ini corral_run_id, env CORRAL_RUN_ID); required with a Redis broker",
    )
    group.addoption(
        "--corral-machines",
        dest="corral_machines",
        default=None,
        type=int,
        metavar="N",
        help="how many pytest invocations share the Redis run; the last one to finish "
        "deletes the run's keys (ini corral_machines, env CORRAL_MACHINES)",
    )
    group.addoption(
        "--corral-shard",
        dest="corral_shard",
        default=None,
        metavar="K/N",
        help="run only the K-th of N shards of the suite (K = 1..N), chosen by a hash of each "
        "test's node id: the same split on every machine, whatever the collection order "
        "(ini corral_shard, env CORRAL_SHARD)",
    )
    parser.addini("corral_dsn", "admin DSN of the PostgreSQL server to use", default="")
    parser.addini("corral_broker", "a Redis URL to coordinate through", default="")
    parser.addini("corral_run_id", "the run's name (--corral-run-id)", default="")
    parser.addini("corral_machines", "pytest invocations sharing the Redis run", default="")
    parser.addini("corral_shard", "run only shard K/N of the suite (--corral-shard)", default="")
    parser.addini(
        "corral_schema",
        "SQL files/directories (relative to the rootdir), or one module:function "
        "called with a DSN, that build the template database",
        type="linelist",
        default=[],
    )
    parser.addini(
        "corral_schema_timeout",
        "seconds a module:function schema step may take before it is killed (default 600)",
        default="",
    )
    parser.addini(
        "corral_schema_watch",
        "more files/directories whose contents key the template (e.g. migrations/)",
        type="linelist",
        default=[],
    )
    parser.addini(
        "corral_database_env",
        "variables that get each process's database: NAME (its URL) or NAME={part}, parts "
        "url, host, port, user, password, dbname, sqlalchemy_url, asyncpg_url",
        type="args",
        default=[],
    )
    parser.addini("corral_database", "auto, on or off (see --corral-database)", default="auto")
    parser.addini(
        "corral_colocate", "off (default), auto or on (see --corral-colocate)", default=""
    )
    parser.addini(
        "corral_gc_freeze", "off (default), auto or on (see --corral-gc-freeze)", default=""
    )
    parser.addini(
        "corral_django",
        "with pytest-django: migrate once per run into templates that every test process "
        "clones: auto (when a database uses PostgreSQL), on, off",
        default="auto",
    )
    parser.addini(
        "corral_sandbox",
        "open a sandbox around every test (default true)",
        type="bool",
        default=True,
    )


def _is_redis_url(url: str) -> bool:
    # The Redis backend is imported only by runs that name a Redis URL.
    from corral.broker.redis import is_redis_url

    return is_redis_url(url)


@dataclass(frozen=True)
class Settings:
    """Everything the plugin reads from options, ini and environment, validated once.

    :ivar dsn: the user's admin DSN, or None for corral's throwaway server.
    :ivar schema: SQL paths (absolute) or ``"module:function"`` entries.
    :ivar database: whether each process gets its own database.
    :ivar broker_url: a Redis URL (the run spans machines), or None for a local broker.
    :ivar run_id: the run's name given by the user (required with *broker_url*).
    :ivar machines: pytest invocations sharing the Redis run, when the user says.
    :ivar host: this machine's name in the run's shared names.
    :ivar colocate: ``auto``, ``on`` or ``off``: pin each test process and its backends
        to one CPU (see :mod:`corral._plugin._colocate`).
    :ivar gc_freeze: whether each test process freezes its heap after collection
        (``auto`` resolved: on when processes get databases; see :mod:`corral._plugin._gc`).
    :ivar shard: ``(K, N)``: this invocation runs the K-th of N shards (1-based), or None.
    """

    dsn: str | None
    schema: tuple[str, ...]
    watch: tuple[Path, ...]
    database_env: tuple[str, ...]
    database: bool
    sandbox: bool
    rootpath: Path
    extra_paths: tuple[Path, ...] = field(default=())
    broker_url: str | None = None
    run_id: str | None = None
    machines: int | None = None
    host: str = field(default_factory=socket.gethostname)
    colocate: str = "off"
    gc_freeze: bool = False
    schema_timeout: float = _SCHEMA_TIMEOUT
    shard: tuple[int, int] | None = None

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
        if env_names:
            from corral._plugin._dbenv import EnvEntryError, parse_entries

            try:
                parse_entries(env_names)  # kept as text: RunInfo carries them to the workers
            except EnvEntryError as exc:
                raise pytest.UsageError(f"corral_database_env: {exc}") from None
        switch = _switch(config, "corral_database")
        if switch == "auto":
            # A DSN alone in a Django project is for Django's test databases (its own
            # templates and clones): an empty clone per process beside them is unused.
            database = bool(schema or env_names or (dsn and not _django_takes_databases(config)))
        else:
            database = switch == "on"
        sandbox = bool(config.getini("corral_sandbox")) and not _option(config, "corral_no_sandbox")
        extra = tuple(dict.fromkeys([base, config.rootpath]))
        broker_url, run_id, machines = _broker_settings(config)
        # Both are visible to the application (os.sched_getaffinity, gc.get_objects): off
        # unless asked for (docs/pytest.md, "What corral changes in a test process").
        colocate = _switch(config, "corral_colocate", ENV_COLOCATE, default="off")
        freeze = _switch(config, "corral_gc_freeze", ENV_GC_FREEZE, default="off")
        shard_text, shard_from = _first(config, "corral_shard", ENV_SHARD)
        shard = parse_shard(shard_text, shard_from) if shard_text is not None else None
        return cls(
            dsn,
            schema,
            watch,
            env_names,
            database,
            sandbox,
            config.rootpath,
            extra,
            broker_url=broker_url,
            run_id=run_id,
            machines=machines,
            host=_host_name(),
            colocate=colocate,
            gc_freeze=database if freeze == "auto" else freeze == "on",
            schema_timeout=_schema_timeout(config),
            shard=shard,
        )

    def schema_source(self) -> Sequence[str] | Callable[[str], Any]:
        """What :func:`corral.postgres.ensure_template` takes: paths, or a callable
        (a ``module:function`` runs in a child process: :class:`SchemaChild`)."""
        if len(self.schema) == 1 and _is_callable_ref(self.schema[0]):
            from corral._plugin._schema import SchemaChild

            return SchemaChild(
                self.schema[0], self.extra_paths, self.database_env, self.schema_timeout
            )
        if not self.schema:
            return empty_schema  # corral_database = on without a schema: empty clones
        return list(self.schema)


def empty_schema(dsn: str) -> None:
    """The schema of ``corral_database = on`` without ``corral_schema``: nothing."""


def _schema_timeout(config: pytest.Config) -> float:
    text = str(config.getini("corral_schema_timeout")).strip()
    if not text:
        return _SCHEMA_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise pytest.UsageError(
            f"ini corral_schema_timeout must be a number of seconds above 0, not {text!r}"
        )
    return seconds


def _first(config: pytest.Config, name: str, env: str | None) -> tuple[str | None, str]:
    """The value of option / ini / environment *name* (that order; *env* None: no
    environment variable), and where it came from."""
    option = _option(config, name)
    if option is not None and str(option).strip():
        return str(option).strip(), "--" + name.replace("_", "-")
    ini = str(config.getini(name)).strip()
    if ini:
        return ini, f"ini {name}"
    value = os.environ.get(env, "").strip() if env else ""
    return (value, env) if env and value else (None, "")


def _switch(config: pytest.Config, name: str, env: str | None = None, default: str = "auto") -> str:
    """``auto``, ``on`` or ``off`` from option / ini / environment *name*, else *default*.

    :raises pytest.UsageError: any other value, naming where it came from.
    """
    value, source = _first(config, name, env)
    value = (value or default).lower()
    if value not in _SWITCH:
        raise pytest.UsageError(f"{source} must be auto, on or off, not {value!r}")
    return value


def _broker_settings(config: pytest.Config) -> tuple[str | None, str | None, int | None]:
    """``(redis_url, run_id, machines)`` from options, ini and environment, validated.

    A ``CORRAL_BROKER_URL`` in the environment alone makes every ``Client()`` a Redis
    client, so it selects the Redis broker for the plugin too: the two always agree.

    :raises pytest.UsageError: not a Redis URL, no or a malformed run id, a bad count.
    """
    url, url_from = _first(config, "corral_broker", ENV_BROKER_URL)
    if url is not None and not _is_redis_url(url):
        raise pytest.UsageError(
            f"{url_from}: {url!r} is not a Redis URL (redis://, rediss:// or unix://). "
            "Without one corral starts its own broker for the run; to share a broker "
            "started by `corral run`, set EPHEMERAL_PIPE instead"
        )
    run_id, run_from = _first(config, "corral_run_id", ENV_RUN_ID)
    text, machines_from = _first(config, "corral_machines", ENV_MACHINES)
    if url is None:
        # A local run names itself: an inherited CORRAL_RUN_ID may be an outer run's
        # (the plugin exports it), and clone names must never collide with that run's.
        explicit = run_from.startswith(("--", "ini"))
        if text is not None and machines_from != ENV_MACHINES:
            raise pytest.UsageError(
                f"{machines_from} needs a Redis broker (--corral-broker / CORRAL_BROKER_URL)"
            )
        return None, (_check_run_id(run_id, run_from) if explicit else None), None
    if run_id is None:
        raise pytest.UsageError(
            f"corral: a Redis broker ({url_from}) needs the run's name: pass --corral-run-id "
            "(ini corral_run_id, env CORRAL_RUN_ID) with a value every machine of this run "
            "shares and no other run uses, e.g. the CI pipeline id and attempt "
            "(gh-$GITHUB_RUN_ID-$GITHUB_RUN_ATTEMPT, gl-$CI_PIPELINE_ID)"
        )
    machines: int | None = None
    if text is not None:
        try:
            machines = int(text)
        except ValueError:
            machines = 0
        if machines < 1:
            raise pytest.UsageError(f"{machines_from} must be a positive integer, got {text!r}")
    return url, _check_run_id(run_id, run_from), machines


def parse_shard(text: str, source: str = "--corral-shard") -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)``, with ``1 <= K <= N`` (CI matrices and GitLab's
    ``CI_NODE_INDEX`` count from 1).

    :raises pytest.UsageError: anything else, naming *source*.
    """
    index, sep, count = text.strip().partition("/")
    try:
        shard = (int(index), int(count)) if sep else None
    except ValueError:
        shard = None
    if shard is None or not 1 <= shard[0] <= shard[1]:
        raise pytest.UsageError(
            f"{source} must be K/N with 1 <= K <= N (the K-th of N shards, counted from 1, "
            f"e.g. 1/4 ... 4/4), got {text!r}"
        )
    return shard


def _check_run_id(run_id: str | None, source: str) -> str | None:
    if run_id is not None and not _RUN_ID.fullmatch(run_id):
        raise pytest.UsageError(
            f"{source}: a run id is 1-64 characters of A-Za-z0-9._- (it names Redis keys "
            f"and databases), got {run_id!r}"
        )
    return run_id


def _host_name() -> str:
    """This machine's name in the run: ``$CORRAL_HOST``, else the host name."""
    return os.environ.get(ENV_HOST, "").strip() or socket.gethostname()


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


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back the variables a run exported (``None``: it was unset) and forget them."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    saved.clear()


def _django_takes_databases(config: pytest.Config) -> bool:
    """Whether Django support will take the run's databases: pytest-django is active with a
    settings module and ``corral_django`` is not off (the settings are not read yet)."""
    manager = config.pluginmanager
    if not (manager.hasplugin("django") or manager.hasplugin("pytest_django.plugin")):
        return False
    if str(config.getini("corral_django")).strip().lower() == "off":
        return False
    known = getattr(config, "known_args_namespace", config.option)
    return bool(
        getattr(known, "ds", None)
        or os.environ.get("DJANGO_SETTINGS_MODULE")
        or config.getini("DJANGO_SETTINGS_MODULE")
    )
