"""Each test process and its database backends on one CPU of their own.

A database test is a chain of round trips: the test process sends a statement and sleeps,
its PostgreSQL backend wakes, answers and sleeps, the test process wakes. On virtual
machines (most CI runners) a wake-up on another vCPU costs tens of microseconds, paid twice
per statement, and the scheduler does not keep the pair together by itself: on the 2-core
VM corral is developed on, a 15-statement test takes 5.5 ms with the pair floating and
2.5 ms with both on one CPU. So when corral runs the database server on this machine, each
test process is pinned to a CPU of its own (xdist worker *n* to the *n*-th allowed CPU;
the single process of ``-n 0`` to the CPU it runs on) and its backends are pinned to the
same CPU as they appear.

When: ini ``corral_colocate`` / ``--corral-colocate`` = ``off`` (the default: the app
would see its affinity), ``auto`` (on when the server is local and verifiable, runs as
this user (or this is root), and every test process can have its own CPU), ``on``
(also when processes must share CPUs). Only on Linux, and only for backends whose
parent is the postmaster found through the server's Unix-socket lock file, or for a DSN
on the loopback (``127.0.0.1``, ``localhost``, ``::1``), as the ``postgres`` process that
holds the listening socket: a pid from a server in a container (behind a port forwarder)
or on another host is never touched. Backends are found by pid, over TCP as over sockets.
The pin covers the test process's main thread and what it starts later (threads,
subprocesses): a suite whose tests run CPU-heavy work in parallel subprocesses should say
``off``. Each pinned process
claims its CPU machine-wide (:mod:`corral._plugin._cpuclaim`), so runs side by side on one
machine spread over different CPUs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral._plugin._cpuclaim import CpuClaim, claim_cpu, preference
from corral.postgres._admin import admin as admin_connect
from corral.postgres._admin import conninfo_params

__all__ = [
    "MODES",
    "Colocation",
    "checks_at",
    "current_cpu",
    "decide",
    "may_pin",
    "postmaster_pid",
]

log = logging.getLogger("corral.pytest")

MODES = ("auto", "on", "off")
_EVERY_TEST_UNTIL = 8  # backends appear early (pools open at import): look at each test,
_THEN_EVERY = 16  # then now and then, for pools that grow later


def checks_at(test_number: int) -> bool:
    """Whether to look for new backends before the *test_number*-th test (from 1) since
    the database was (re)created."""
    return test_number <= _EVERY_TEST_UNTIL or test_number % _THEN_EVERY == 0


def decide(
    mode: str,
    *,
    supported: bool,
    postmaster: int | None,
    processes: int,
    cpus: int,
    permitted: bool = True,
) -> tuple[bool, str]:
    """Whether to co-locate, and why not when not (for ``-v`` and the log)."""
    if mode == "off":
        return False, "corral_colocate = off"
    if not supported:
        return False, "CPU affinity is Linux-only"
    if postmaster is None:
        return False, "the server's postmaster is not visible from here (remote or container)"
    if not permitted:
        return False, "the server runs as another user, whose processes this one cannot pin"
    if cpus < 2:
        return False, "one CPU: nothing to gain"
    if mode == "auto" and processes > cpus:
        return False, f"{processes} test processes for {cpus} CPUs (corral_colocate = on forces it)"
    return True, ""


def postmaster_pid(dsn_params: dict[str, Any]) -> int | None:
    """The pid of the server's postmaster, when the server runs on this machine.

    Through a socket directory: the pid its lock file names. Through the loopback: the
    ``postgres`` process holding the port's listening socket (seen in ``/proc``, so only
    when this process may read that one's descriptors: the same user, or root). None when
    neither finds a live ``postgres`` process.
    """
    host = str(dsn_params.get("host") or "")
    port = str(dsn_params.get("port") or "5432")
    hosts = host.split(",")
    directory = next((h for h in hosts if h.startswith("/")), None)
    if not port.isdigit():
        return None
    if directory is None:
        return _listener_pid(int(port)) if hosts[0] in _LOOPBACK else None
    try:
        first = (Path(directory) / f".s.PGSQL.{port}.lock").read_text().split("\n", 1)[0]
        pid = int(first.strip())
    except (OSError, ValueError):
        return None
    return pid if _command(pid) in _POSTGRES else None


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_POSTGRES = ("postgres", "postmaster")
#: /proc/net/tcp{,6} local addresses a loopback client may reach: 127.0.0.1, 0.0.0.0,
#: ::1, :: and ::ffff:127.0.0.1 (as the kernel prints them: 32-bit words, host order).
_LISTEN_ADDRESSES = {
    "0100007F",
    "00000000",
    "00000000000000000000000001000000",
    "00000000000000000000000000000000",
    "0000000000000000FFFF00000100007F",
}
_LISTEN = "0A"


def _listener_pid(port: int) -> int | None:
    """The ``postgres`` process listening on *port* of this machine's loopback, or None."""
    sockets: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == _LISTEN and int(hex_port, 16) == port and address in _LISTEN_ADDRESSES:
                sockets.add(f"socket:[{fields[9]}]")
    if not sockets:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _command(int(entry.name)) not in _POSTGRES:
            continue
        parent = _parent(int(entry.name))
        if parent is not None and _command(parent) in _POSTGRES:
            continue  # a backend: postmasters close their listening sockets in children
        try:
            descriptors = os.listdir(entry / "fd")
        except OSError:  # another user's process, or gone
            continue
        for fd in descriptors:
            try:
                if os.readlink(entry / "fd" / fd) in sockets:
                    return int(entry.name)
            except OSError:
                continue
    return None


def may_pin(pid: int) -> bool:
    """Whether this process may set the CPU affinity of *pid*: root, or the same user."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return os.geteuid() in (0, owner)


def _command(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def current_cpu() -> int | None:
    """The CPU this thread runs on now (``/proc/thread-self/stat``, field 39), or None."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[36])  # field 39 of stat(5); fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    match = re.match(r".*\) \S+ (\d+)", stat, re.DOTALL)
    return int(match.group(1)) if match else None


class Colocation:
    """Pins this test process and the backends of its database to one CPU.

    Registered as a pytest plugin by the process that owns it: before each test it may
    look up the database's backends (``pg_stat_activity``, on an admin connection of its
    own) and pin the new ones. ``stop()`` gives the process its CPUs back.

    :param admin_dsn: where to ask for the database's backends.
    :param database: the test process's own database.
    :param cpu: the CPU to share.
    :param postmaster: the server's postmaster pid (backends must be its children).
    :param connect: opens an autocommit connection to *admin_dsn* (default: the one
        ``corral.postgres`` uses).
    :param generation: changes whenever the database is recreated (a ``no_sandbox`` test).
    """

    def __init__(
        self,
        admin_dsn: str,
        database: str,
        cpu: int,
        postmaster: int,
        connect: Callable[[str], Any] | None = None,
        generation: Callable[[], int] = lambda: 0,
    ) -> None:
        self.admin_dsn = admin_dsn
        self.database = database
        self.cpu = cpu
        self.postmaster = postmaster
        self.pinned: set[int] = set()
        self.failed = ""
        self._connect = connect or admin_connect
        self._conn: Any = None
        self._saved: set[int] | None = None
        self._tests = 0
        self.generation = generation
        self._generation = generation()
        #: CPUs to claim in order when pinning (None: pin to *cpu*, claim nothing).
        self.candidates: list[int] | None = None
        #: Pin to the first candidate even when other runs' processes claim them all.
        self.share = False
        #: This process's machine-wide claim on *cpu* (released by :meth:`stop`).
        self.claim: CpuClaim | None = None

    @classmethod
    def plan(
        cls,
        mode: str,
        admin_dsn: str,
        database: str,
        worker: str | None,
        workers: int,
        generation: Callable[[], int] = lambda: 0,
    ) -> tuple[Colocation | None, str]:
        """A Colocation for this process, or None and the reason."""
        supported = hasattr(os, "sched_setaffinity") and Path("/proc/self/stat").exists()
        postmaster = postmaster_pid(conninfo_params(admin_dsn)) if supported else None
        allowed = os.sched_getaffinity(0) if supported else set()
        on, why = decide(
            mode,
            supported=supported,
            postmaster=postmaster,
            processes=workers,
            cpus=len(allowed),
            permitted=postmaster is not None and may_pin(postmaster),
        )
        if not on:
            return None, why
        assert postmaster is not None
        if worker and re.fullmatch(r"gw\d+", worker):
            first = int(worker[2:])  # workers spread over the CPUs
        else:
            # The only test process: where the scheduler put it first.
            here = current_cpu()
            first = sorted(allowed).index(here) if here in allowed else 0
        order = preference(allowed, first)
        colocation = cls(admin_dsn, database, order[0], postmaster, generation=generation)
        # The CPU is claimed when the process pins itself (before its first test, so an
        # xdist controller, which runs none, claims none): test processes of other runs
        # on this machine may sit on some of these CPUs.
        colocation.candidates = order
        colocation.share = mode == "on"
        return colocation, ""

    def start(self) -> None:
        """Pin this (the main) thread; what it starts later inherits the CPU.

        Called before the first test this process runs (an xdist controller runs none,
        so it is never pinned).
        """
        if self._saved is not None or self.failed:
            return
        if self.candidates is not None and self.claim is None:
            claim = claim_cpu(self.candidates)
            if claim is None and not self.share:
                self._give_up(
                    "every CPU it may use is taken by test processes of other corral runs "
                    "(corral_colocate = on shares them)",
                    level=logging.INFO,
                )
                return
            self.claim = claim or CpuClaim(self.candidates[0], None)
            self.cpu = self.claim.cpu
        try:
            self._saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {self.cpu})
        except OSError as exc:
            self._give_up(f"cannot pin this process to CPU {self.cpu}: {exc}")
            return
        log.debug("co-located on CPU %d with database %s", self.cpu, self.database)

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self.failed:
            return
        if self._saved is None:
            self.start()
        generation = self.generation()
        if generation != self._generation:  # the database was recreated: new backends
            self._generation = generation
            self._tests = 0
        self._tests += 1
        if checks_at(self._tests):
            self.pin_backends()

    def pin_backends(self) -> int:
        """Pin the database's backends not pinned yet; how many were pinned now."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect(self.admin_dsn)
            rows = self._conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                "AND backend_type = 'client backend'",
                [self.database],
            )
        except Exception as exc:  # never fail a test over a speed-up
            self._give_up(f"cannot list the database's backends: {exc}")
            return 0
        pinned = 0
        for (pid,) in rows:
            if pid in self.pinned or _parent(pid) != self.postmaster:
                continue
            try:
                os.sched_setaffinity(pid, {self.cpu})
            except ProcessLookupError:
                continue  # it ended meanwhile
            except OSError as exc:
                self._give_up(f"cannot pin backend {pid}: {exc}")
                return pinned
            self.pinned.add(pid)
            pinned += 1
        return pinned

    def _give_up(self, why: str, level: int = logging.WARNING) -> None:
        self.failed = why
        log.log(level, "corral_colocate: %s; running without co-location", why)
        self.stop()

    def stop(self) -> None:
        """Give the process its CPUs back and close the admin connection. Idempotent."""
        self.failed = self.failed or "stopped"
        if self._saved is not None:
            try:
                os.sched_setaffinity(0, self._saved)
            except OSError as exc:
                log.debug("restoring the CPU affinity: %s", exc)
            self._saved = None
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:
                log.debug("closing the co-location connection: %s", exc)
        if self.claim is not None:
            self.claim.release()
