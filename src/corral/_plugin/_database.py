"""This test process's own database: a slot leased through the broker, cloned from the template.

The slot number comes from a broker lease owned by this process's connection, so when
the process dies its slot frees at once and the replacement worker takes it over; every
acquisition clones afresh, which is how a crashed worker's database gets recycled. Under
xdist the controller pre-creates the first workers' databases (:class:`PreCloner`) while
they boot; a worker takes such a database only if nobody had it before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from corral._plugin._dbenv import process_env
from corral._plugin._run import SLOT_KEY, AnyClient, RunInfo
from corral._plugin._settings import restore_env
from corral.broker import Client
from corral.errors import BrokerError, BrokerTimeout, CorralError
from corral.postgres import clone_database, database_dsn, drop_database

__all__ = ["HANDOVER_TIMEOUT", "SLOT_KEY", "PreCloner", "WorkerDatabase", "take_precloned"]

log = logging.getLogger("corral.pytest")

# Leases are freed when the holder's connection closes; the TTL is only a backstop and
# must outlive any run, so it is renewed now and then (see renew()).
_LEASE_TTL = 24 * 3600.0
_RENEW_EVERY = 3600.0
# How long a worker waits for the controller to finish the clone it is making for it:
# a clone takes well under a second; one that takes minutes is stuck, and nothing else
# (pytest-timeout included) would end the wait at start-up.
HANDOVER_TIMEOUT = 120.0
# The pre-clone hand-over's keys live as long as a run may (the broker's own TTL default
# may be short when `corral run` started it).
_KEY_TTL = 24 * 3600.0


def _handover_keys(name: str, controller_pid: int) -> tuple[str, str, str]:
    """The lock, claim and fresh-mark keys of database *name* (see :class:`PreCloner`).

    Keyed by the database's name and the controller: runs that share a broker (``corral
    run``) share slot numbers, and with a fixed ``corral_run_id`` names too, but never a
    controller process.
    """
    tail = f"{controller_pid}:{name}"
    return f"corral:preclone:{tail}", f"corral:claimed:{tail}", f"corral:fresh:{tail}"


def take_precloned(client: AnyClient, name: str, controller_pid: int, worker: str) -> bool:
    """Whether the controller pre-created database *name* (:class:`PreCloner`) and nobody
    used it yet; False: the caller makes its own.

    Claiming the name first decides who makes it: a worker that wins the claim makes
    its own and the controller leaves the name alone; one that loses waits on the
    lock the controller clones under, then consumes the fresh mark, which only the
    name's first holder finds (a crashed worker's replacement clones afresh).
    """
    lock, claim, fresh = _handover_keys(name, controller_pid)
    try:
        if client.add(claim, worker, ttl=_KEY_TTL):
            return False
    except BrokerError as exc:  # a broker without `add`: the controller could not claim
        log.debug("no pre-created database for %s: %s", name, exc)
        return False
    # No fallback past this point: cloning the name ourselves could race the controller.
    try:
        with client.lock(lock, timeout=HANDOVER_TIMEOUT):
            return bool(client.delete(fresh))
    except BrokerTimeout as exc:
        raise CorralError(
            f"the run's controller has been creating this process's database {name} "
            f"for over {HANDOVER_TIMEOUT:g} s (CREATE DATABASE is stuck: a session "
            "connected to the template, or a server that stopped answering); see "
            "pg_stat_activity, or run with -p no:xdist to take pre-creation out of the way"
        ) from exc


class WorkerDatabase:
    """The clone one process (xdist worker, or the only process) runs its tests on.

    :param info: the run's shared facts (admin DSN, template, controller pid).
    :param client: this process's broker connection (or Redis session); it owns the
        slot's lease.
    :param worker: a name unique in the run, e.g. ``"gw0@1234"`` (``"runner-3/gw0@1234"``
        when the run spans machines).
    """

    def __init__(self, info: RunInfo, client: AnyClient, worker: str) -> None:
        assert info.admin_dsn is not None
        assert info.template is not None
        self.info = info
        self.client = client
        self.worker = worker
        self.slot: int | None = None
        self.name = ""
        self.url = ""
        self.timings: dict[str, list[float]] = {"clone": [], "recreate": []}
        self.recycled = 0
        #: Whether acquire() took a database the controller had pre-created.
        self.precloned = False
        self._renewed = 0.0
        self._env_saved: dict[str, str | None] = {}

    def acquire(self) -> str:
        """Lease a slot, take its pre-created database or (re)create it, export its URL;
        returns the URL."""
        info = self.info
        self.slot = self.client.lease(SLOT_KEY, self.worker, ttl=_LEASE_TTL)
        self._renewed = time.monotonic()
        self.name = info.clone_name(self.slot)
        self.url = database_dsn(info.admin_dsn, self.name)  # type: ignore[arg-type]
        started = time.perf_counter()
        self.precloned = self._take_precloned()
        if not self.precloned:
            # A database under this slot belonged to a process that died: start clean.
            if drop_database(info.admin_dsn, self.name):  # type: ignore[arg-type]
                self.recycled += 1
                log.info("recycled database %s of a worker that went away", self.name)
            self._clone()
        # The time this process waited for its database, however it came to have one.
        self.timings["clone"].append(time.perf_counter() - started)
        self._export()
        return self.url

    def recreate(self) -> None:
        """Replace the database with a fresh clone under the same name (same URL)."""
        started = time.perf_counter()
        drop_database(self.info.admin_dsn, self.name)  # type: ignore[arg-type]
        self._clone()
        self.timings["recreate"].append(time.perf_counter() - started)

    def renew(self) -> None:
        """Keep the slot's lease alive in very long runs (cheap; rate-limited)."""
        if self.slot is not None and time.monotonic() - self._renewed > _RENEW_EVERY:
            self.client.lease(SLOT_KEY, self.worker, ttl=_LEASE_TTL)
            self._renewed = time.monotonic()

    def release(self) -> None:
        """Give the slot back; the controller drops the databases at the end of the run."""
        restore_env(self._env_saved)
        port = self._socket_port()
        if port is not None:
            from corral.sandbox._targets import remove_socket_route

            remove_socket_route(port)
        if self.slot is not None:
            self.slot = None
            try:
                self.client.release(self.worker)
            except Exception as exc:  # the broker may be gone already (Ctrl-C)
                log.debug("releasing database slot: %s", exc)

    def _take_precloned(self) -> bool:
        """Whether the controller pre-created this slot's database and nobody used it yet
        (see :func:`take_precloned`)."""
        info = self.info
        if info.broker_url or info.controller_pid == os.getpid():
            return False  # no pre-cloning: a Redis run, or no xdist (this is the controller)
        return take_precloned(self.client, self.name, info.controller_pid, self.worker)

    def _clone(self) -> None:
        info = self.info
        clone_database(
            info.admin_dsn,  # type: ignore[arg-type]
            info.template,  # type: ignore[arg-type]
            self.name,
            # Marked as the controller's: a worker that exits must not make it look stale.
            owner_pid=info.controller_pid,
            run_id=info.run_id,
        )

    def _export(self) -> None:
        """The URL under ``CORRAL_DATABASE_URL``, each ``corral_database_env`` entry in its
        shape, and libpq's ``PGHOST``... (:func:`~corral._plugin._dbenv.process_env`).

        On corral's throwaway server, also its socket directory for the sandbox: asyncpg
        keeps the URL's 127.0.0.1 (TCP), and its sandboxes connect through the socket."""
        for name, value in process_env(self.url, self.info.database_env).items():
            self._env_saved.setdefault(name, os.environ.get(name))
            os.environ[name] = value
        port = self._socket_port()
        if port is not None:
            from corral.sandbox._targets import add_socket_route

            assert self.info.socket_dir is not None
            add_socket_route(port, self.info.socket_dir)

    def _socket_port(self) -> int | None:
        """The throwaway server's TCP port (None: no throwaway server, or no TCP)."""
        if not self.info.socket_dir:
            return None
        split = urlsplit(self.url)
        return split.port if split.hostname == "127.0.0.1" else None


class PreCloner:
    """The xdist controller's background thread that clones the first workers' databases.

    Workers take ~300 ms to boot while the controller idles; cloning their databases then
    takes the clone off each worker's start-up path. One database at a time, in the order
    workers lease slots (the smallest free integers): under the lock of its name, claim
    it, clone it, mark it fresh, unlock. Failures are logged, never raised, and cost only
    the name that failed: its worker clones its own. :meth:`stop` joins the thread, so no
    clone appears after the run's clean-up listed the run's databases; :meth:`forget`
    then deletes the hand-over keys from the broker.

    :param info: the run (local broker, database part on).
    :param workers: how many workers xdist starts.
    :param own_slot: the controller's own slot, which no worker will lease.
    :param jobs: ``(admin DSN, template, database)`` to make instead, in this order, for
        databases whose names are known in advance (Django's, named after the workers).
    :param ready: for templates still being built meanwhile: called in the thread, in a
        loop, before the first clone; waits up to the seconds given and says None (still
        building), True (built) or False (the build failed: nothing is made).
    """

    def __init__(
        self,
        info: RunInfo,
        workers: int,
        own_slot: int | None,
        *,
        jobs: list[tuple[str, str, str]] | None = None,
        ready: Callable[[float], bool | None] | None = None,
    ) -> None:
        self.info = info
        self._jobs = jobs
        self._ready = ready
        self.workers = workers
        self.own_slot = own_slot
        #: The databases made, in order.
        self.made: list[str] = []
        #: The names it tried (their hand-over keys may exist).
        self.tried: list[str] = []
        #: Seconds the thread ran, once it has ended.
        self.seconds: float | None = None
        #: The first error, if any name failed.
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        # A daemon: a clone that hangs must not keep the interpreter from exiting (stop()
        # gives up waiting; the next run's stale clean-up drops what it made late).
        self._thread = threading.Thread(target=self._run, name="corral-preclone", daemon=True)

    def start(self) -> None:
        """Start the thread; returns at once."""
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> bool:
        """Let the clone in progress finish, skip the others, and join; True when it ended.

        Waits once: called again (session finish, then the config's clean-up), it only
        says whether the thread has ended.
        """
        if not self._stopping.is_set():
            self._stopping.set()
            if self._thread.ident is not None:
                self._thread.join(timeout)
        return not self._thread.is_alive()

    def forget(self) -> None:
        """Delete the hand-over keys of every name it tried (after :meth:`stop`, once the
        workers are done): nothing of the hand-over stays in the broker."""
        if not self.tried:
            return
        try:
            with Client(self.info.broker_path) as client:
                for name in self.tried:
                    _, claim, fresh = _handover_keys(name, self.info.controller_pid)
                    client.delete(claim)
                    client.delete(fresh)
        except BrokerError as exc:  # the broker is going away: its keys go with it
            log.debug("could not delete the pre-clone keys: %s", exc)

    def slots(self, client: Client) -> list[int]:
        """The slots the next :attr:`workers` leases will get: the smallest free ones."""
        taken = {self.own_slot}
        try:
            holders = client.status().get("holders", [])
        except BrokerError as exc:  # a broker without `status`: assume only ours is taken
            log.debug("broker status unavailable (%s)", exc)
            holders = []
        taken.update(
            h.get("item") for h in holders if h.get("kind") == "lease" and h.get("name") == SLOT_KEY
        )
        free: list[int] = []
        slot = 0
        while len(free) < self.workers:
            if slot not in taken:
                free.append(slot)
            slot += 1
        return free

    def jobs(self, client: Client) -> list[tuple[str, str, str]]:
        """``(admin DSN, template, database)`` to make, in the order workers need them: the
        run's template cloned under the names of the slots the workers will lease."""
        if self._jobs is not None:
            return list(self._jobs)
        admin, template = self.info.admin_dsn, self.info.template
        assert admin is not None
        assert template is not None
        return [(admin, template, self.info.clone_name(slot)) for slot in self.slots(client)]

    def _wait_ready(self) -> bool:
        """Whether the templates were built (False also when stopped meanwhile)."""
        while self._ready is not None and not self._stopping.is_set():
            built = self._ready(0.1)
            if built is not None:
                return built
        return not self._stopping.is_set()

    def _run(self) -> None:
        if not self._wait_ready():
            return  # seconds stays None: it made nothing
        started = time.perf_counter()
        try:
            with Client(self.info.broker_path) as client:
                for admin, template, name in self.jobs(client):
                    if self._stopping.is_set():
                        break
                    self.tried.append(name)
                    try:
                        self._clone(client, admin, template, name)
                    except Exception as exc:  # this name only: its worker clones its own
                        self._failed(name, exc)
        except Exception as exc:  # the broker: nothing more can be handed over
            self._failed("", exc)
        finally:
            self.seconds = time.perf_counter() - started

    def _failed(self, name: str, exc: Exception) -> None:
        first, self.error = self.error is None, self.error or exc
        what = f"pre-creating {name}" if name else "pre-creating the workers' databases"
        # Once is enough to know why (a server that went away fails every name alike).
        log.log(logging.WARNING if first else logging.DEBUG, "corral: %s failed: %s", what, exc)

    def _clone(self, client: Client, admin: str, template: str, name: str) -> None:
        lock, claim, fresh = _handover_keys(name, self.info.controller_pid)
        try:
            with client.lock(lock, timeout=0):
                if not client.add(claim, "controller", ttl=_KEY_TTL):
                    return  # its worker came first and makes its own
                clone_database(
                    admin,
                    template,
                    name,
                    owner_pid=self.info.controller_pid,
                    run_id=self.info.run_id,
                )
                client.set(fresh, True, ttl=_KEY_TTL)
        except BrokerTimeout:
            return  # held by a worker that claimed the name first
        self.made.append(name)
