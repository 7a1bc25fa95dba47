"""Find the PostgreSQL server binaries on this machine (or in the ``pgserver`` wheel).

Order: ``CORRAL_PG_BINDIR`` (exclusive), then every system install found through
``pg_config --bindir``, ``PATH`` and the usual package locations, newest version first, and
only then the ``pgserver`` wheel's binaries (the fallback for machines without PostgreSQL).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import PostgresNotFound

#: directories where distributions and installers put PostgreSQL's ``bin`` (globbed).
_KNOWN_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # PGDG RPMs (RHEL, Fedora)
    "/usr/local/pgsql/bin",  # built from source
    "/usr/local/lib/postgresql*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew on Apple silicon
    "/opt/homebrew/opt/postgresql/bin",
    "/usr/local/opt/postgresql@*/bin",  # Homebrew on Intel
    "/usr/local/opt/postgresql/bin",
    "/Applications/Postgres.app/Contents/Versions/*/bin",
    "/usr/lib/postgresql*/bin",  # openSUSE
)

#: postmaster.pid reports "ready" (how a start is detected) since PostgreSQL 10.
MIN_VERSION = 10

_INSTALL_HINT = (
    "install PostgreSQL's server package (Debian/Ubuntu: `apt-get install postgresql`; "
    "Fedora/RHEL: `dnf install postgresql-server`; macOS: `brew install postgresql@16`), "
    "or `pip install 'corral[pgserver]'` for binaries from PyPI, "
    "or point CORRAL_PG_BINDIR at a directory holding `postgres` and `initdb`"
)


@dataclass(frozen=True, order=False)
class PostgresBinaries:
    """One PostgreSQL installation: its ``bin`` directory and server version.

    :ivar bindir: the directory holding ``postgres`` and ``initdb``.
    :ivar version: the server version as integers, e.g. ``(15, 4)``.
    :ivar version_string: what ``postgres --version`` printed.
    :ivar source: how it was found (``CORRAL_PG_BINDIR``, ``pg_config``, ``PATH``,
        ``known location``, ``pgserver``, ``argument``).
    """

    bindir: Path
    version: tuple[int, ...]
    version_string: str
    source: str = field(default="", compare=False)

    @property
    def major(self) -> int:
        """The major version (``15`` for 15.4; ``9`` for 9.6 is never supported here)."""
        return self.version[0]

    @property
    def postgres(self) -> Path:
        return self.bindir / "postgres"

    @property
    def initdb(self) -> Path:
        return self.bindir / "initdb"

    @property
    def install_root(self) -> Path:
        """The installation's root (``bindir``'s parent), which holds ``lib`` and ``share``."""
        return self.bindir.parent


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / exe, os.X_OK) for exe in ("postgres", "initdb"))


@functools.lru_cache(maxsize=32)
def _probe(bindir: Path, mtime_ns: int) -> tuple[tuple[int, ...], str] | None:
    """Ask ``postgres --version``; ``mtime_ns`` is only part of the cache key (upgrades)."""
    del mtime_ns
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out)
    if match is None:
        return None
    version = tuple(int(part) for part in match.groups() if part is not None)
    return version, out


def _probe_dir(bindir: Path, source: str) -> PostgresBinaries | None:
    try:
        bindir = bindir.resolve()
        mtime = (bindir / "postgres").stat().st_mtime_ns
    except OSError:
        return None
    if not _has_server(bindir):
        return None
    probed = _probe(bindir, mtime)
    if probed is None or probed[0][0] < MIN_VERSION:
        return None
    return PostgresBinaries(bindir, probed[0], probed[1], source)


def pgserver_bindir() -> Path | None:
    """The ``bin`` directory of the ``pgserver`` wheel, without importing it.

    Importing ``pgserver`` runs code (and warns); only its files are needed.
    """
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bindir = Path(location) / "pginstall" / "bin"
        if bindir.is_dir():
            return bindir
    return None


def _system_candidates() -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            found.append((Path(out), "pg_config"))
    for exe in ("postgres", "initdb"):
        path = shutil.which(exe)
        if path:
            found.append((Path(path).resolve().parent, "PATH"))
    for pattern in _KNOWN_GLOBS:
        found.extend((Path(hit), "known location") for hit in sorted(glob.glob(pattern)))
    return found


def find_all_binaries() -> list[PostgresBinaries]:
    """Every usable installation: system ones newest first, then the ``pgserver`` wheel's."""
    seen: set[Path] = set()
    system: list[PostgresBinaries] = []
    for bindir, source in _system_candidates():
        found = _probe_dir(bindir, source)
        if found is not None and found.bindir not in seen:
            seen.add(found.bindir)
            system.append(found)
    # sorted() is stable: for equal versions the discovery order (pg_config first) wins.
    system.sort(key=lambda b: b.version, reverse=True)
    wheel_dir = pgserver_bindir()
    if wheel_dir is not None:
        wheel = _probe_dir(wheel_dir, "pgserver")
        if wheel is not None and wheel.bindir not in seen:
            system.append(wheel)
    return system


def find_binaries(
    bindir: str | os.PathLike[str] | None = None, *, version: int | None = None
) -> PostgresBinaries:
    """Find the PostgreSQL server binaries to run.

    :param bindir: use exactly this directory (default: ``CORRAL_PG_BINDIR``, else search).
    :param version: require this major version (default: ``CORRAL_PG_VERSION``, else the
        newest system installation, else the ``pgserver`` wheel).
    :raises PostgresNotFound: nothing usable was found; the message says what to install.
    """
    explicit, source = (bindir, "argument") if bindir is not None else (None, "")
    if explicit is None and os.environ.get("CORRAL_PG_BINDIR"):
        explicit, source = os.environ["CORRAL_PG_BINDIR"], "CORRAL_PG_BINDIR"
    if version is None and os.environ.get("CORRAL_PG_VERSION"):
        try:
            version = int(os.environ["CORRAL_PG_VERSION"])
        except ValueError:
            raise PostgresNotFound(
                f"CORRAL_PG_VERSION={os.environ['CORRAL_PG_VERSION']!r} is not a major version "
                "number such as 15"
            ) from None
    if explicit is not None:
        found = _probe_dir(Path(explicit), source)
        if found is None:
            raise PostgresNotFound(
                f"{source} is {os.fspath(explicit)!r}, but that directory has no working "
                f"`postgres` and `initdb` of PostgreSQL {MIN_VERSION} or newer; {_INSTALL_HINT}"
            )
        if version is not None and found.major != version:
            raise PostgresNotFound(
                f"{source} {os.fspath(explicit)!r} holds PostgreSQL {found.major}, "
                f"not the required {version}"
            )
        return found
    candidates = find_all_binaries()
    if version is not None:
        matching = [c for c in candidates if c.major == version]
        if not matching:
            have = ", ".join(f"{c.major} ({c.bindir})" for c in candidates) or "none"
            raise PostgresNotFound(
                f"PostgreSQL {version} is required (CORRAL_PG_VERSION) but not installed; "
                f"found: {have}"
            )
        return matching[0]
    if not candidates:
        where = "pg_config --bindir, PATH, " + ", ".join(_KNOWN_GLOBS) + ", the pgserver wheel"
        platform_note = " (Windows is not supported)" if sys.platform == "win32" else ""
        raise PostgresNotFound(
            f"no PostgreSQL server binaries found{platform_note}; looked in: {where}. "
            f"To fix: {_INSTALL_HINT}"
        )
    return candidates[0]
