"""``corral postgres``: run a throwaway server until Ctrl-C, printing its DSN."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from types import FrameType
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``postgres`` command to the ``corral`` CLI."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "postgres",
        help="start a throwaway PostgreSQL server, print its DSN, keep it up until Ctrl-C",
        description=(
            "Start a throwaway PostgreSQL server (the one corral's tests use), print its "
            "superuser DSN on stdout and keep it running until Ctrl-C or SIGTERM. Nothing is "
            "left behind afterwards."
        ),
    )
    parser.add_argument(
        "--tcp",
        action="store_true",
        help="also listen on 127.0.0.1 and print the URL the pytest plugin hands out "
        "(postgresql://postgres:PW@127.0.0.1:PORT/postgres?host=SOCKET_DIR) after the DSN",
    )
    parser.add_argument(
        "--port", type=int, help="port (TCP, and the socket's name); default 5432, free with --tcp"
    )
    parser.add_argument("--pg-version", type=int, help="major version to use (e.g. 16)")
    parser.add_argument("--bindir", help="PostgreSQL bin directory to use")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting (repeatable), e.g. --set log_statement=all",
    )
    parser.add_argument(
        "--schema",
        action="append",
        default=[],
        metavar="FILE",
        help="SQL file or directory: build its template and a clone; print the clone's DSN too",
    )
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="only remove clusters left by dead processes, then exit",
    )
    parser.add_argument(
        "--clear-cache", action="store_true", help="only empty the initdb cache, then exit"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    parser.set_defaults(handler=_run)


def _settings(pairs: list[str]) -> dict[str, str | int | None] | None:
    settings: dict[str, str | int | None] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            print(f"corral postgres: --set wants NAME=VALUE, got {pair!r}", file=sys.stderr)
            return None
        settings[name.strip()] = value
    return settings


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    from corral.errors import PostgresError
    from corral.postgres import (
        EphemeralPostgres,
        cleanup_stale_clusters,
        clear_cache,
        clone_database,
        database_dsn,
        ensure_template,
    )

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.cleanup:
        for path in cleanup_stale_clusters():
            print(f"removed {path}", file=sys.stderr)
        return 0
    if args.clear_cache:
        print(f"removed {clear_cache()} cache entries", file=sys.stderr)
        return 0
    settings = _settings(args.set)
    if settings is None:
        return 2
    server = EphemeralPostgres(
        bindir=args.bindir, version=args.pg_version, port=args.port, tcp=args.tcp, settings=settings
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        try:
            server.start()
            print(server.dsn, flush=True)
            if args.tcp:
                # The URL the pytest plugin hands out: a host and a port for URL parsers,
                # the socket directory in its query for libpq.
                print(server.url, flush=True)
            if args.schema:
                template = ensure_template(server.dsn, args.schema)
                clone = clone_database(server.dsn, template)
                url = server.url_for(clone) if args.tcp else database_dsn(server.dsn, clone)
                print(url, flush=True)
        except PostgresError as exc:
            print(f"corral postgres: {exc}", file=sys.stderr)
            return 1
        print(
            f"PostgreSQL {'.'.join(map(str, server.version))} from {server.bindir} is up "
            f"(started in {server.start_seconds:.2f} s); Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        while server.running:
            time.sleep(0.5)
        print("corral postgres: the server exited:\n" + server.log_text()[-4000:], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
