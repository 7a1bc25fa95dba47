"""The controlling process's run-wide resources: broker, database server, template.

Started once before any worker exists (xdist's controller, or the only process) and
stopped after the last worker; what workers need travels as :class:`RunInfo`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest

from corral._plugin._settings import ENV_RUN, Settings
from corral.broker import Broker, Client
from corral.errors import BrokerError, CorralError, TemplateBuildError
from corral.postgres import EphemeralPostgres, drop_stale_databases, ensure_template

__all__ = ["Run", "RunInfo"]

log = logging.getLogger("corral.pytest")


@dataclass(frozen=True)
class RunInfo:
    """What every test process of one run needs to know (JSON in ``CORRAL_PLUGIN_RUN``).

    :ivar controller_pid: the process that owns the run; clones are marked with it.
    :ivar admin_dsn: superuser DSN of the database server (None: database part off).
    :ivar template: the template database every clone copies.
    """

    run_id: str
    controller_pid: int
    broker_path: str
    admin_dsn: str | None = None
    template: str | None = None
    sandbox: bool = True
    database_env: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunInfo:
        data = json.loads(text)
        data["database_env"] = tuple(data.get("database_env", ()))
        return cls(**data)

    def clone_name(self, slot: int) -> str:
        return f"corral_{self.run_id}_{slot}"


@dataclass
class Run:
    """Starts and stops what one test run shares; used only by the controlling process."""

    settings: Settings
    info: RunInfo | None = None
    broker: Broker | None = None
    server: EphemeralPostgres | None = None
    timings: dict[str, float] = field(default_factory=dict)
    reused_broker: bool = False
    _env_saved: dict[str, str | None] = field(default_factory=dict)

    def start(self) -> RunInfo:
        """Start (or reuse) the broker, the database server, and build the template.

        :raises pytest.UsageError: something could not start, or the schema failed; the
            message carries the original error. Whatever had started is stopped again.
        """
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> RunInfo:
        settings = self.settings
        run_id = secrets.token_hex(4)
        path = self._broker()
        admin_dsn: str | None = None
        template: str | None = None
        if settings.database:
            admin_dsn = self._server()
            template = self._template(admin_dsn)
        self.info = RunInfo(
            run_id=run_id,
            controller_pid=os.getpid(),
            broker_path=path,
            admin_dsn=admin_dsn,
            template=template,
            sandbox=settings.sandbox,
            database_env=settings.database_env,
        )
        self._setenv(ENV_RUN, self.info.to_json())
        self._setenv("CORRAL_RUN_ID", run_id)
        return self.info

    def _broker(self) -> str:
        inherited = os.environ.get("EPHEMERAL_PIPE")
        if inherited:
            # `corral run -- pytest ...` (or a Node runner) already started one: share it.
            try:
                with Client(inherited, timeout=2.0) as client:
                    client.ping()
            except BrokerError as exc:
                log.warning(
                    "EPHEMERAL_PIPE=%s does not answer (%s); starting a broker", inherited, exc
                )
            else:
                self.reused_broker = True
                return inherited
        started = time.perf_counter()
        # Leases taken by the plugin last the whole run: no default TTL could be right.
        self.broker = Broker(require_ttl=False, default_ttl=7 * 24 * 3600.0)
        path = self.broker.start()
        self.timings["broker start"] = time.perf_counter() - started
        return path

    def _server(self) -> str:
        if self.settings.dsn:
            started = time.perf_counter()
            try:
                # Clones of runs whose controller died (kill -9, power loss) on this host.
                dropped = drop_stale_databases(self.settings.dsn)
            except CorralError as exc:
                raise pytest.UsageError(
                    f"corral: cannot use {_redact(self.settings.dsn)}: {exc}"
                ) from exc
            except Exception as exc:  # psycopg.OperationalError: cannot connect
                raise pytest.UsageError(
                    f"corral: cannot connect to the database server {_redact(self.settings.dsn)} "
                    f"(--corral-dsn / corral_dsn / CORRAL_DSN): {exc}"
                ) from exc
            if dropped:
                log.info("dropped %d stale database(s) of crashed runs", len(dropped))
            self.timings["stale clean-up"] = time.perf_counter() - started
            return self.settings.dsn
        started = time.perf_counter()
        try:
            self.server = EphemeralPostgres().start()
        except CorralError as exc:
            raise pytest.UsageError(
                f"corral: cannot start a throwaway PostgreSQL: {exc}\n"
                "Point corral at a server instead: --corral-dsn / corral_dsn / CORRAL_DSN"
            ) from exc
        self.timings["postgres start"] = time.perf_counter() - started
        return self.server.dsn

    def _template(self, admin_dsn: str) -> str:
        settings = self.settings
        started = time.perf_counter()
        try:
            template = ensure_template(admin_dsn, settings.schema_source(), watch=settings.watch)
        except TemplateBuildError as exc:
            cause = exc.__cause__
            detail = f"\n{type(cause).__name__}: {cause}" if cause else ""
            if cause is not None and str(cause).strip() in str(exc):
                detail = ""  # TemplateBuildError already quotes it
            raise pytest.UsageError(
                "corral: the schema failed to build (corral_schema), so no test ran.\n"
                f"{exc}{detail}"
            ) from exc
        self.timings["template"] = time.perf_counter() - started
        return template

    def _setenv(self, name: str, value: str) -> None:
        self._env_saved.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def drop_clones(self) -> list[str]:
        """Drop every clone of this run (on a server corral did not start)."""
        info = self.info
        if info is None or info.admin_dsn is None or self.server is not None:
            return []
        started = time.perf_counter()
        try:
            dropped = drop_stale_databases(info.admin_dsn, run_id=info.run_id)
        except Exception as exc:  # never let clean-up hide the run's own result
            log.warning("could not drop this run's databases: %s", exc)
            return []
        self.timings["drop clones"] = time.perf_counter() - started
        return dropped

    def stop(self) -> None:
        """Drop this run's clones, stop the server and the broker. Idempotent."""
        self.drop_clones()
        server, self.server = self.server, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.stop()
        for name, value in self._env_saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._env_saved.clear()

    def holdings(self) -> list[dict[str, Any]]:
        """What clients still hold in the broker (empty when the broker is not ours)."""
        broker = self.broker
        if broker is None or not broker.running:
            return []
        return broker.holdings()


def _redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
    except Exception:
        return "<the configured DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)  # type: ignore[arg-type]
