"""The initdb cache: run ``initdb`` once per version and settings, copy its result per run;
and :func:`prune`, which keeps corral's caches (this one's siblings too) from growing.

An entry is ``<cache>/pg<major>-<key>/data`` plus ``meta.json`` (written last, so an entry
without it is incomplete). The key hashes the ``postgres --version`` output, the binaries'
path, the initdb arguments and the server's uid. Builders serialise on an ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from corral.errors import PostgresStartError
from corral.postgres._binaries import PostgresBinaries
from corral.postgres._osuser import ServerUser

log = logging.getLogger("corral.postgres")

#: bump when the layout or the default initdb arguments change.
_FORMAT = 1


def default_cache_dir() -> Path:
    """``CORRAL_PG_CACHE_DIR``, else ``$XDG_CACHE_HOME/corral/postgres``, else ``~/.cache/...``."""
    if os.environ.get("CORRAL_PG_CACHE_DIR"):
        return Path(os.environ["CORRAL_PG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "corral" / "postgres"


def initdb_arguments(binaries: PostgresBinaries, extra: Sequence[str] = ()) -> list[str]:
    """The initdb arguments corral uses: trust auth, C locale, no fsync, small WAL segments."""
    args = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
    if binaries.major >= 11:
        # 1 MB WAL segments instead of 16 MB: a smaller directory to copy on every start.
        args.append("--wal-segsize=1")
    if binaries.major >= 14:
        args.append("--no-instructions")
    return [*args, *extra]


def cache_key(binaries: PostgresBinaries, user: ServerUser, args: Sequence[str]) -> str:
    material = json.dumps(
        [_FORMAT, binaries.version_string, str(binaries.bindir), list(args), user.uid]
    )
    return f"pg{binaries.major}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def server_env() -> dict[str, str]:
    """The environment for initdb/postgres: ours without libpq's ``PG*`` variables.

    ``PGPORT``, ``PGDATA`` and friends are read by the server tools too and would override
    what corral decided.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def run_initdb(
    binaries: PostgresBinaries, user: ServerUser, data_dir: Path, args: Sequence[str]
) -> None:
    """Run initdb as *user* into the (empty, *user*-owned) *data_dir*."""
    started = time.perf_counter()
    result = subprocess.run(
        [str(binaries.initdb), "-D", str(data_dir), *args],
        capture_output=True,
        text=True,
        cwd="/",
        env=server_env(),
        check=False,
        **user.popen_kwargs(),
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise PostgresStartError(
            f"initdb ({binaries.initdb}) failed with exit code {result.returncode} "
            f"as user {user.name!r}:\n{output}",
            log=output,
        )
    log.info("initdb of %s took %.2f s", data_dir, time.perf_counter() - started)


def copy_tree(source: Path, target: Path, user: ServerUser) -> None:
    """Copy a data directory, keeping *user* as its owner; *target* must not exist."""
    cp = shutil.which("cp")
    if cp is not None:
        # cp -a keeps owners as root and is much faster than copytree on ~1000 small files.
        command = [cp, "-a"]
        if sys.platform.startswith("linux"):
            command.append("--reflink=auto")
        result = subprocess.run(
            [*command, str(source), str(target)], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            return
        log.debug("cp -a failed (%s); falling back to copytree", result.stderr.strip())
        shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True)
    if not user.is_current:
        for root, dirs, files in os.walk(target):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), user.uid, user.gid)
        os.chown(target, user.uid, user.gid)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _entry_ready(entry: Path) -> bool:
    return (entry / "meta.json").is_file() and (entry / "data" / "PG_VERSION").is_file()


def materialize(
    binaries: PostgresBinaries,
    user: ServerUser,
    data_dir: Path,
    *,
    extra_args: Sequence[str] = (),
    cache_dir: Path | None = None,
    use_cache: bool = True,
    identity: PostgresBinaries | None = None,
) -> bool:
    """Create a fresh cluster in *data_dir* (must not exist): a cache copy, else initdb.

    *identity* is the installation the cache entry is keyed on when *binaries* is a copy of
    it (see ``reachable_binaries``). Returns ``True`` when the cache was warm.
    """
    args = initdb_arguments(binaries, extra_args)
    if not use_cache:
        _fresh_initdb(binaries, user, data_dir, args)
        return False
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    entry = cache_dir / cache_key(identity or binaries, user, args)
    if _entry_ready(entry):
        copy_tree(entry / "data", data_dir, user)
        return True
    with _flock(cache_dir / f"{entry.name}.lock"):
        if _entry_ready(entry):  # a concurrent process built it while we waited
            copy_tree(entry / "data", data_dir, user)
            return True
        # initdb straight into this run's directory (reachable by the server user, unlike a
        # cache under /root), then copy it into the cache before the server touches it.
        _fresh_initdb(binaries, user, data_dir, args)
        staging = cache_dir / f"{entry.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        copy_tree(data_dir, staging / "data", user)
        meta = {
            "format": _FORMAT,
            "version": binaries.version_string,
            "bindir": str(binaries.bindir),
            "initdb_args": args,
            "uid": user.uid,
            "created": time.time(),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(entry, ignore_errors=True)  # an incomplete leftover
        os.rename(staging, entry)
        log.info("cached initdb result in %s", entry)
    return False


def _fresh_initdb(
    binaries: PostgresBinaries, user: ServerUser, data_dir: Path, args: Sequence[str]
) -> None:
    data_dir.mkdir(mode=0o700)
    user.chown(data_dir)
    run_initdb(binaries, user, data_dir, args)


def clear_cache(cache_dir: Path | None = None) -> int:
    """Remove every cached initdb result; returns how many entries were removed."""
    cache_dir = cache_dir or default_cache_dir()
    if not cache_dir.is_dir():
        return 0
    removed = 0
    for entry in cache_dir.iterdir():
        if entry.is_dir() and entry.name.startswith("pg"):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        elif entry.suffix == ".lock":
            entry.unlink(missing_ok=True)
    return removed


def cache_root() -> Path:
    """The directory of corral's caches: the initdb cache's parent (``~/.cache/corral``)."""
    return default_cache_dir().parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune(
    directory: Path,
    *,
    keep: int,
    max_age: float,
    key: Callable[[Path], str],
    suffix: str = "",
    now: float | None = None,
) -> list[Path]:
    """Remove cache entries of *directory* that are no longer worth keeping; returns them.

    An entry (a file or directory whose name ends with *suffix*) goes when it was last used
    (its mtime: touch it on use) more than *max_age* seconds ago, or when *keep* entries of
    the same ``key(entry)`` were used after it. Partial entries of writers that died
    (``<name>.tmp-<pid>``, the names this module's writers use) go too. Never raises:
    an entry that cannot be removed stays.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    groups: dict[str, list[tuple[float, Path]]] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        _name, partial, pid = entry.name.rpartition(".tmp-")
        if partial:
            if pid.isdigit() and not _pid_alive(int(pid)):
                removed.append(entry)
            continue
        if not entry.name.endswith(suffix) or entry.name.endswith(".lock"):
            continue
        try:
            used = entry.stat().st_mtime
        except OSError:
            continue
        if now - used > max_age:
            removed.append(entry)
        else:
            groups.setdefault(key(entry), []).append((used, entry))
    for group in groups.values():
        group.sort(key=lambda item: item[0], reverse=True)
        removed.extend(entry for _used, entry in group[keep:])
    gone: list[Path] = []
    for entry in removed:
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            log.debug("could not prune %s: %s", entry, exc)
            continue
        gone.append(entry)
    return gone
