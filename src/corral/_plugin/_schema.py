"""The schema step's ``module:function``, run in a child process that dies with the run.

Run in the test process, a migration (Alembic's ``env.py``) fills the app's caches (an
``lru_cache``d settings object) with the template's URL, and the tests then talk to the
template. The child is the same interpreter with the ini directory and rootdir
importable, and the template's URL in ``CORRAL_DATABASE_URL``, in every
``corral_database_env`` entry (in its shape) and in the libpq variables. Its output is
kept and shown only when it fails. The controller never imports the module: the
template is named from the module's file, found without running it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib.machinery import PathFinder
from importlib.util import find_spec
from pathlib import Path

import pytest

from corral._plugin._dbenv import ENV_SANDBOX_MODE, URL_VARIABLE, parse_entries, process_env
from corral.postgres._templates import TEMPLATE_PREFIX, function_hash

__all__ = ["SchemaChild", "SchemaStepFailed", "child_env", "module_source", "set_variables"]

# Lines of the child's output a failure shows (its end, where the traceback is).
_TAIL_LINES = 60

# Runs in the child with `python -c`; argv: ref, then directories to make importable.
# It reads the URL from the environment (never argv: `ps` shows argv, and the URL may
# hold a password), asks to be killed when its parent dies (Linux), and prints the
# function's traceback without this bootstrap's frame.
_BOOTSTRAP = """\
import importlib, os, sys, traceback
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
except Exception:
    pass
if os.getppid() != int(os.environ.pop("CORRAL_SCHEMA_PARENT")):
    sys.exit(70)  # the run ended while this process started
def report(exc):
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        sys.exit(0)
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    sys.exit(1)
ref, paths = sys.argv[1], sys.argv[2:]
sys.path[:0] = [p for p in paths if p not in sys.path]
dsn = os.environ["CORRAL_DATABASE_URL"]
module_name, _, func_name = ref.partition(":")
try:
    module = importlib.import_module(module_name)
except BaseException as exc:
    report(exc)
func = getattr(module, func_name, None)
if not callable(func):
    print(f"corral_schema: {module_name} has no function {func_name!r}", file=sys.stderr)
    sys.exit(2)
try:
    func(dsn)
except BaseException as exc:
    report(exc)
"""


class SchemaStepFailed(Exception):
    """The schema step's child process failed or timed out (internal: it reaches the
    user as the ``__cause__`` of a :class:`~corral.errors.TemplateBuildError`, which the
    plugin turns into a usage error).

    :ivar output: what the child wrote to stdout and stderr (its last lines).
    """

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def module_source(module: str, paths: Sequence[Path] = ()) -> bytes | None:
    """The source of *module*, found on *paths* then ``sys.path`` without importing it.

    Falls back to :func:`importlib.util.find_spec` (which imports parent packages) for
    modules only a custom finder knows, e.g. an editable install's.

    :returns: None when the module is nowhere to be found.
    """
    search = [str(p) for p in paths] + sys.path
    spec = None
    locations: Sequence[str] | None = search
    parts = module.split(".")
    for depth in range(len(parts)):
        if locations is None:  # a module where a package was needed
            spec = None
            break
        spec = PathFinder.find_spec(".".join(parts[: depth + 1]), list(locations))
        if spec is None:
            break
        locations = spec.submodule_search_locations
    if spec is None:
        try:
            spec = find_spec(module)
        except (ImportError, ValueError):
            spec = None
    origin = spec.origin if spec is not None else None
    if origin is None or not os.path.isfile(origin):
        return None
    return Path(origin).read_bytes()


def child_env(
    dsn: str, database_env: Iterable[str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The child's environment: *base* (default ``os.environ``) plus the template's URL
    in ``CORRAL_DATABASE_URL``, every ``corral_database_env`` entry and libpq's variables.

    :raises ValueError: an entry is malformed (the settings reject those first).
    """
    env = dict(os.environ if base is None else base)
    env.update(process_env(dsn, database_env))
    # No test process: handles it wraps with sandbox(...) pass through.
    env[ENV_SANDBOX_MODE] = "normal"
    return env


def set_variables(dsn: str, database_env: Iterable[str]) -> list[str]:
    """The names :func:`child_env` gives the URL (or a part of it) under, for messages:
    ``CORRAL_DATABASE_URL``, the entries, then libpq's."""
    entries = [e.name for e in parse_entries(database_env)]
    names = [URL_VARIABLE, *entries]
    return names + [n for n in process_env(dsn, database_env) if n not in names]


class SchemaChild:
    """``fn(dsn)`` for :func:`corral.postgres.ensure_template` that runs *ref* in a child.

    :param ref: ``module:function``.
    :param paths: directories the child can import from, first (ini directory, rootdir).
    :param database_env: the raw ``corral_database_env`` entries.
    :param timeout: seconds the step may take; then the child is killed.
    """

    def __init__(
        self,
        ref: str,
        paths: Sequence[Path] = (),
        database_env: Sequence[str] = (),
        timeout: float = 600.0,
    ) -> None:
        self.ref = ref
        self.paths = tuple(paths)
        self.database_env = tuple(database_env)
        self.timeout = timeout
        #: The variables the last run got the template's URL in (for messages).
        self.variables: list[str] = []
        module, _, func = ref.partition(":")
        # What ensure_template's messages and marks call it.
        self.__module__ = module
        self.__qualname__ = func

    def template_name(self, watch: Iterable[Path] = ()) -> str:
        """The template's name, as :func:`corral.postgres.template_name` of the function.

        :raises pytest.UsageError: the module cannot be found.
        """
        source = module_source(self.__module__, self.paths)
        if source is None:
            raise pytest.UsageError(
                f"corral_schema: cannot find module {self.__module__!r} (looked in "
                f"{', '.join(str(p) for p in self.paths) or 'nowhere'} and on sys.path)"
            )
        digest = function_hash(self.__module__, self.__qualname__, source, watch=watch)
        return TEMPLATE_PREFIX + digest[:24]

    def command(self) -> list[str]:
        paths = [str(p) for p in self.paths]
        paths += [p for p in sys.path if p and p not in paths]
        return [sys.executable, "-c", _BOOTSTRAP, self.ref, *paths]

    def __call__(self, dsn: str) -> None:
        env = child_env(dsn, self.database_env)
        self.variables = set_variables(dsn, self.database_env)
        env["CORRAL_SCHEMA_PARENT"] = str(os.getpid())
        child = subprocess.Popen(
            self.command(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own process group: killed as a group (with whatever it started) on a
            # timeout or Ctrl-C, which the terminal sends to the run's group only.
            start_new_session=True,
        )
        try:
            out, _ = child.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            out = _stop(child)
            raise SchemaStepFailed(
                f"{self.ref} did not finish within {self.timeout:g} s "
                "(corral_schema_timeout) and was killed",
                _tail(out),
            ) from None
        except BaseException:
            _stop(child)
            raise
        if child.returncode != 0:
            raise SchemaStepFailed(
                f"{self.ref} failed (exit status {child.returncode})", _tail(out)
            )


def _stop(child: subprocess.Popen[bytes]) -> bytes:
    """Kill the child's process group; what it wrote until then."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    try:
        out, _ = child.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a grandchild kept the pipe open
        child.kill()
        return b""
    return out or b""


def _tail(out: bytes) -> str:
    lines = out.decode(errors="replace").rstrip().splitlines()
    if len(lines) <= _TAIL_LINES:
        return "\n".join(lines)
    cut = len(lines) - _TAIL_LINES
    return "\n".join([f"[{cut} earlier lines left out]", *lines[cut:]])
