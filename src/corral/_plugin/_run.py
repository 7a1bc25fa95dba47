"""The controlling process's run-wide resources: broker, database server, template.

Started once before any worker exists (xdist's controller, or the only process) and
stopped after the last worker; what workers need travels as :class:`RunInfo`. With a
Redis broker the run may span machines: each machine's controller joins it by name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import pytest

from corral._plugin._settings import (
    ENV_BROKER_URL,
    ENV_RUN,
    ENV_RUN_ID,
    Settings,
    restore_env,
)

if TYPE_CHECKING:
    # The server, the clients, the database parts and the errors they raise are imported
    # when the run uses them.
    from corral._plugin._census import Census
    from corral._plugin._lazybroker import LazyBroker
    from corral.broker import Broker, Client
    from corral.broker.redis import RedisClient
    from corral.postgres import EphemeralPostgres

__all__ = ["SLOT_KEY", "AnyClient", "Run", "RunInfo", "open_client"]

log = logging.getLogger("corral.pytest")

# PostgreSQL truncates longer identifiers (NAMEDATALEN - 1), which could merge two names.
_MAX_NAME = 63
# Databases dropped side by side at the end of a run.
_DROP_THREADS = 8

AnyClient: TypeAlias = "Client | RedisClient"

#: The broker lease key whose integers number the run's databases.
SLOT_KEY = "corral:databases"


@dataclass(frozen=True)
class RunInfo:
    """What every test process of one run needs to know (JSON in ``CORRAL_PLUGIN_RUN``).

    :ivar controller_pid: the process that owns the run; clones are marked with it.
    :ivar admin_dsn: superuser DSN of the database server (None: database part off).
    :ivar template: the template database every clone copies.
    :ivar broker_url: the Redis URL of a run that may span machines (else None, and
        *broker_path* is the local broker's socket).
    :ivar clone_tag: with Redis, a token of this machine's controller in its clones'
        names: each machine creates and drops only databases of its own.
    :ivar socket_dir: the Unix socket directory of the throwaway server corral started,
        which also answers on *admin_dsn*'s 127.0.0.1 port (None: the user's server,
        never rerouted); asyncpg sandboxes connect through it (``sandbox/_targets.py``).
    """

    run_id: str
    controller_pid: int
    broker_path: str
    admin_dsn: str | None = None
    template: str | None = None
    sandbox: bool = True
    database_env: tuple[str, ...] = ()
    broker_url: str | None = None
    clone_tag: str = ""
    socket_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunInfo:
        data = json.loads(text)
        data["database_env"] = tuple(data.get("database_env", ()))
        return cls(**data)

    def clone_name(self, slot: int) -> str:
        """``corral_<run>_<slot>`` (``corral_<run>_<tag>_<slot>`` with Redis), <= 63 bytes."""
        tail = f"_{self.clone_tag}_{slot}" if self.clone_tag else f"_{slot}"
        run = self.run_id
        if len("corral_") + len(run) + len(tail) > _MAX_NAME:
            import hashlib

            digest = hashlib.sha1(run.encode()).hexdigest()[:8]
            run = run[: _MAX_NAME - len("corral_") - len(tail) - 9] + "-" + digest
        return f"corral_{run}{tail}"


def _token(size: int) -> str:
    """*size* random bytes in hex, as ``secrets.token_hex`` makes them (``secrets`` pulls
    in ``hashlib`` and ``hmac``: compiled in every run without a bytecode cache)."""
    return os.urandom(size).hex()


def open_client(info: RunInfo, worker: str | None = None) -> AnyClient:
    """A blocking client of *info*'s broker: the local socket one, or Redis.

    :param worker: the name :meth:`~corral.broker.redis.RedisClient.status` shows for
        this client (host-qualified: every machine has a ``gw0``).
    """
    if info.broker_url:
        from corral.broker.redis import RedisClient

        return RedisClient(info.broker_url, run_id=info.run_id, worker_id=worker)
    from corral.broker.client import Client

    return Client(info.broker_path)


@dataclass
class Run:
    """Starts and stops what one test run shares; used only by the controlling process."""

    settings: Settings
    info: RunInfo | None = None
    broker: Broker | LazyBroker | None = None
    server: EphemeralPostgres | None = None
    timings: dict[str, float] = field(default_factory=dict)
    reused_broker: bool = False
    redis: RedisClient | None = None
    census: Census | None = None
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
        if settings.broker_url:
            assert settings.run_id is not None  # Settings requires it with a Redis URL
            run_id, path, tag = settings.run_id, "", _token(3)
            self._redis(settings.broker_url, run_id, tag)
        else:
            run_id, tag = settings.run_id or _token(4), ""
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
            broker_url=settings.broker_url,
            clone_tag=tag,
            socket_dir=self.server.host if self.server is not None else None,
        )
        self._setenv(ENV_RUN, self.info.to_json())
        self._setenv(ENV_RUN_ID, run_id)
        if settings.broker_url:
            # Every Client() of every process (workers, the app, helper scripts) is then a
            # RedisClient of this run: CORRAL_BROKER_URL wins over EPHEMERAL_PIPE.
            self._setenv(ENV_BROKER_URL, settings.broker_url)
        return self.info

    def _redis(self, url: str, run_id: str, tag: str) -> None:
        """Check that Redis answers and record this machine in the run (:class:`Census`)."""
        from corral._plugin._census import Census
        from corral.broker.redis import RedisClient
        from corral.errors import BrokerError

        started = time.perf_counter()
        try:
            self.redis = RedisClient(url, run_id=run_id, worker_id=f"{self.settings.host}/main")
            self.redis.ping()
            if self.settings.machines is None:
                self.redis.join()  # a live session until the end: the run is not over
            census = Census(
                self.redis, tag, self.settings.host, self.settings.machines, self.settings.shard
            )
            census.start()
            self.census = census
        except (BrokerError, ValueError, ImportError) as exc:
            raise pytest.UsageError(
                f"corral: cannot use the Redis broker (--corral-broker / corral_broker / "
                f"CORRAL_BROKER_URL): {exc}"
            ) from exc
        self.timings["redis connect"] = time.perf_counter() - started

    def _broker(self) -> str:
        inherited = os.environ.get("EPHEMERAL_PIPE")
        if inherited:
            from corral.broker.client import Client
            from corral.errors import BrokerError

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
        options: dict[str, Any] = {"require_ttl": False, "default_ttl": 7 * 24 * 3600.0}
        if self.settings.database:
            from corral.broker.server import Broker

            self.broker = Broker(**options)
        else:
            # Nothing of the plugin's own talks to it: its server starts if a test does.
            from corral._plugin._lazybroker import LazyBroker

            self.broker = LazyBroker(**options)
        path = self.broker.start()
        self.timings["broker start"] = time.perf_counter() - started
        return path

    def _server(self) -> str:
        from corral.errors import CorralError
        from corral.postgres import EphemeralPostgres, drop_stale_databases

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
            # TCP on 127.0.0.1 (with a password) beside the private socket: URLs with a
            # host and a port are what every URL parser accepts (pydantic's PostgresDsn),
            # and the socket directory in their query is what libpq and SQLAlchemy use.
            self.server = EphemeralPostgres(tcp=True).start()
        except CorralError as exc:
            raise no_throwaway(exc) from exc
        self.timings["postgres start"] = time.perf_counter() - started
        return self.server.url

    def _template(self, admin_dsn: str) -> str:
        from corral._plugin._schema import SchemaChild, SchemaStepFailed
        from corral.errors import EmptyTemplate, TemplateBuildError
        from corral.postgres import ensure_template

        settings = self.settings
        started = time.perf_counter()
        source = settings.schema_source()
        # A module:function is named from its file: the controller never imports it.
        name = source.template_name(settings.watch) if isinstance(source, SchemaChild) else None
        try:
            template = ensure_template(
                admin_dsn,
                source,
                watch=settings.watch,
                name=name,
                # Only a schema step can build the wrong database: none builds nothing.
                require_objects=bool(settings.schema),
            )
        except EmptyTemplate as exc:
            if isinstance(source, SchemaChild):
                how = (
                    f"corral ran {source.ref} with the template's URL as its argument and in "
                    f"{', '.join(source.variables)}"
                )
            else:
                how = f"corral ran {exc.source} on the template itself"
            raise pytest.UsageError(
                "corral: the schema step ran but created no table in the template (does "
                "your migration environment read the URL from somewhere else?)\n"
                f"{how}; the template {exc.template} was dropped, so no test ran. "
                "See docs/adopting.md, 'Alembic env.py that reads app settings'."
            ) from exc
        except TemplateBuildError as exc:
            cause = exc.__cause__
            if isinstance(cause, SchemaStepFailed):
                output = f"\nIts output:\n{cause.output}" if cause.output else " (no output)"
                raise pytest.UsageError(
                    f"corral: the schema step {cause}, so no test ran.{output}"
                ) from exc
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
        """Drop this controller's clones (on a server corral did not start).

        Only its own: other machines of a Redis run share the run id and the server, and
        may still be testing on theirs. Clones are marked with the controller's pid.
        """
        info = self.info
        if info is None or info.admin_dsn is None or self.server is not None:
            return []
        from concurrent.futures import ThreadPoolExecutor

        from corral.postgres import drop_database
        from corral.postgres._databases import controller_clones

        started = time.perf_counter()
        host = socket.gethostname()
        admin = info.admin_dsn
        try:
            names = [
                db.name
                for db in controller_clones(admin, info.run_id, info.controller_pid)
                if db.host == host
            ]
        except Exception as exc:  # never let clean-up hide the run's own result
            log.warning("could not list this run's databases to drop them: %s", exc)
            return []

        def drop(name: str) -> bool:
            try:
                return drop_database(admin, name)
            except Exception as exc:  # the others are still dropped
                log.warning("could not drop %s: %s", name, exc)
                return False

        # Side by side: one after the other, the drops of an -n 8 run (~13 ms each) sat
        # end to end on the run's last step.
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), _DROP_THREADS))) as pool:
            dropped = [name for name, ok in zip(names, pool.map(drop, names), strict=True) if ok]
        self.timings["drop clones"] = time.perf_counter() - started
        return dropped

    def leave_redis(self) -> int:
        """Count this invocation out of the Redis run; the last of ``--corral-machines``
        deletes the run's keys. Without that count, the last controller whose session
        is still live deletes them (``purge_if_last``). Returns how many keys it
        deleted (0: not the last)."""
        client, self.redis = self.redis, None
        if client is None:
            return 0
        from corral._plugin._census import Census
        from corral.errors import BrokerError

        deleted = 0
        try:
            machines = self.settings.machines
            if machines is not None:
                # Counted already when the session finished (the census); else now.
                census = self.census or Census(client, "", self.settings.host, machines)
                finished = census.count_out()
                if finished >= machines:
                    # Every invocation of the run has ended its workers: nobody uses the
                    # keys any more (a late extra one would start from an empty run).
                    deleted = client.purge()
                    log.info("last of %d machines: deleted %d Redis keys", machines, deleted)
            else:
                deleted = client.purge_if_last() or 0
                if deleted:
                    log.info("last machine out: deleted %d Redis keys", deleted)
        except BrokerError as exc:
            log.warning("could not finish the Redis run (its keys expire by themselves): %s", exc)
        finally:
            client.close()
        return deleted

    def stop(self) -> None:
        """Drop this run's clones, stop the server and the broker. Idempotent."""
        self.drop_clones()
        self.leave_redis()
        server, self.server = self.server, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.stop()
        restore_env(self._env_saved)

    def holdings(self) -> list[dict[str, Any]]:
        """What clients still hold in the local broker (empty when it is not ours; the
        report asks ``status()`` first, which also covers Redis)."""
        broker = self.broker
        if broker is None or not broker.running:
            return []
        return broker.holdings()


def no_throwaway(exc: Exception, why: str = "") -> pytest.UsageError:
    """The error of a run that needs a throwaway PostgreSQL and cannot start one (*exc*
    says why: no binaries, initdb failed ...); *why* the run needed it, in parentheses."""
    return pytest.UsageError(
        f"corral: cannot start a throwaway PostgreSQL{why}: {exc}\n"
        "Point corral at a server instead: --corral-dsn / corral_dsn / CORRAL_DSN"
    )


def _redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
    except ImportError:  # asyncpg alone: a URL
        from corral.postgres._admin import conninfo_params

        parts = conninfo_params(dsn)
        if "password" in parts:
            parts["password"] = "***"
        return " ".join(f"{key}={value}" for key, value in parts.items())
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<the configured DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)  # type: ignore[arg-type]
