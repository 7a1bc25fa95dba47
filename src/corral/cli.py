"""The ``corral`` command line: one argparse tree, each area registers its subcommands.

Every handler returns an exit code; :func:`main` never calls ``sys.exit`` itself so the
CLI can be driven from tests (``main(["ping"]) == 0``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module has ``register(subparsers)`` that adds its commands with
# ``set_defaults(handler=fn)`` where ``fn(args) -> int``.
_COMMAND_MODULES = (
    "corral.broker._cli",
    "corral._postgres_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Run-scoped broker and database sandboxes for parallel test suites.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with *argv* (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code: int = handler(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
