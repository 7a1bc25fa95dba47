"""The broker's CLI commands: ``corral run -- CMD``, ``corral broker``, and debugging
commands (``ping``, ``get``, ``set``, ``del``, ``keys``, ``stats``, ``health``, ``metrics``,
``status``).

Exit codes: 0 success, 1 the broker refused (e.g. key not found), 2 usage,
3 no broker reachable; ``run`` exits with the command's code (128+N on signal N).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from corral.broker._socketfile import is_alive
from corral.broker._status_text import render_status
from corral.broker.client import Client
from corral.broker.server import Broker
from corral.errors import BrokerError, BrokerRequestError, BrokerUnavailable

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the broker's commands to the ``corral`` parser."""
    run = sub.add_parser(
        "run",
        help="run a command with a broker for its lifetime",
        description="Start a broker, run CMD with EPHEMERAL_PIPE (and EPHEMERAL_SECRET) set, "
        "forward SIGINT/SIGTERM/SIGHUP/SIGQUIT to it, stop the broker, and exit with CMD's "
        "exit code (128+N when CMD died of signal N).",
    )
    _broker_options(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    run.set_defaults(handler=cmd_run)

    serve = sub.add_parser(
        "broker",
        help="serve a broker in the foreground and print its socket path",
        description="Serve a broker until SIGINT/SIGTERM (or --idle-timeout); the first "
        "line on stdout is the socket path.",
    )
    _broker_options(serve)
    serve.set_defaults(handler=cmd_broker)

    def client_cmd(
        name: str, help_: str, fn: Callable[[Client, argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=f"{help_} (broker at $EPHEMERAL_PIPE).")
        p.add_argument("--socket", metavar="PATH", help="broker socket (default $EPHEMERAL_PIPE)")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
        p.set_defaults(handler=lambda args: _with_client(args, fn))
        return p

    client_cmd("ping", "check the broker answers; print the latency in ms", _ping)
    p = client_cmd("get", "print a key's value as JSON", _get)
    p.add_argument("key")
    p = client_cmd("set", "set a key (VALUE is parsed as JSON, else stored as a string)", _set)
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--ttl", type=float, default=None, help="seconds to live")
    p.add_argument("--string", action="store_true", help="store VALUE as a string, never JSON")
    p = client_cmd("del", "delete a key", _del)
    p.add_argument("key")
    client_cmd("keys", "list the live keys, one per line", _keys)
    client_cmd("stats", "print the broker's stats as JSON", _stats)
    client_cmd("health", "print the broker's health as JSON (exit 1 when degraded)", _health)
    client_cmd("metrics", "print the broker's Prometheus metrics", _metrics)
    p = client_cmd(
        "status",
        "show who holds what and who waits for what (run it when a parallel run hangs)",
        _status,
    )
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")


def _broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", help="socket path (default: private temp dir)")
    p.add_argument(
        "--secret-env",
        nargs="?",
        const="",
        default=None,
        metavar="VAR",
        help="require a secret: read it from environment variable VAR, or generate a "
        "random one when VAR is omitted; children get it as EPHEMERAL_SECRET",
    )
    p.add_argument(
        "--no-require-ttl", action="store_true", help="allow set without a TTL (default TTL)"
    )
    p.add_argument("--default-ttl", type=float, default=1800.0, help="seconds (default 1800)")
    p.add_argument("--max-items", type=int, default=10_000)
    p.add_argument("--max-value-size", type=int, default=256 * 1024)
    p.add_argument("--max-request-size", type=int, default=1024 * 1024)
    p.add_argument(
        "--max-bytes",
        type=int,
        default=512 * 1024 * 1024,
        help="most bytes of keys, pools and queued items, by the broker's estimate (0: no limit)",
    )
    p.add_argument("--idle-timeout", type=float, default=None, help="stop after idle seconds")
    p.add_argument("--debug", action="store_true", help="debug logs on stderr")


def _make_broker(args: argparse.Namespace) -> Broker:
    secret: str | None = None
    if args.secret_env is not None:
        if args.secret_env:
            secret = os.environ.get(args.secret_env)
            if not secret:
                raise _UsageError(f"--secret-env {args.secret_env}: that variable is empty")
        else:
            secret = secrets.token_hex(32)
    return Broker(
        require_ttl=not args.no_require_ttl,
        default_ttl=args.default_ttl,
        max_items=args.max_items,
        max_value_size=args.max_value_size,
        max_request_size=args.max_request_size,
        max_bytes=args.max_bytes,
        secret=secret,
        idle_timeout=args.idle_timeout,
        debug=args.debug,
        socket_path=args.socket,
    )


class _UsageError(Exception):
    pass


def _err(message: str) -> None:
    print(f"corral: {message}", file=sys.stderr)


# ---------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        _err("run: give a command after --, e.g. `corral run -- pytest -n 4`")
        return EXIT_USAGE
    try:
        broker = _make_broker(args)
    except (_UsageError, ValueError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    if hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwaitinfo"):
        return _run_sigwait(broker, cmd)
    return _run_handlers(broker, cmd)  # pragma: no cover - non-Linux fallback


def _spawn_error(cmd: list[str], exc: OSError) -> int:
    if isinstance(exc, FileNotFoundError):
        _err(f"run: command not found: {cmd[0]}")
        return 127
    _err(f"run: cannot execute {cmd[0]}: {exc.strerror or exc}")
    return 126


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _run_sigwait(broker: Broker, cmd: list[str]) -> int:
    """Run *cmd* under *broker*, forwarding signals with exact knowledge of their origin.

    Signals are blocked and taken synchronously with ``sigwaitinfo``: a SIGINT typed at
    the terminal already reached CMD (same process group), so only signals sent to us
    by ``kill`` are forwarded and CMD never gets a Ctrl-C twice.
    """
    watched = {*_FORWARDED, signal.SIGCHLD}
    # Block before the broker thread starts, so it inherits the mask too.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        try:
            broker.start()
        except BrokerError as exc:
            _err(f"run: {exc}")
            return EXIT_UNAVAILABLE
        try:
            env = dict(os.environ)  # start() exported EPHEMERAL_PIPE / EPHEMERAL_SECRET
            try:
                pid = os.posix_spawnp(
                    cmd[0],
                    cmd,
                    env,
                    setsigmask=old_mask,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, *_FORWARDED),
                )
            except OSError as exc:
                return _spawn_error(cmd, exc)
            while True:
                info = signal.sigwaitinfo(watched)
                if info.si_signo == signal.SIGCHLD:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done == pid:
                        return _exit_code(status)
                    continue
                from_terminal = info.si_code == 0x80  # SI_KERNEL: generated by the tty
                if not from_terminal:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, info.si_signo)
        finally:
            broker.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _run_handlers(broker: Broker, cmd: list[str]) -> int:  # pragma: no cover
    try:
        broker.start()
    except BrokerError as exc:
        _err(f"run: {exc}")
        return EXIT_UNAVAILABLE
    previous: dict[signal.Signals, Any] = {}
    try:
        try:
            child = subprocess.Popen(cmd)
        except OSError as exc:
            return _spawn_error(cmd, exc)

        def forward(signum: int, frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

        for sig in _FORWARDED:
            previous[sig] = signal.signal(sig, forward)
        code = child.wait()
        return 128 - code if code < 0 else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        broker.stop()


# ---------------------------------------------------------------------- broker


def cmd_broker(args: argparse.Namespace) -> int:
    try:
        broker = _make_broker(args)
    except (_UsageError, ValueError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        try:
            path = broker.start()
        except BrokerError as exc:
            _err(f"broker: {exc}")
            return EXIT_UNAVAILABLE
        print(path, flush=True)
        try:
            # Wait for a stop signal, or for the broker to stop by itself (idle timeout).
            while broker.running:
                if signal.sigtimedwait(stop_signals, 0.2) is not None:
                    break
        finally:
            broker.stop()
        return 0
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


# ---------------------------------------------------------------------- clients


def running_brokers() -> list[str]:
    """Sockets of brokers with a private directory (the default) that answer, newest first.

    Only this user's: the directories are 0700. What `corral status` offers when it is
    not told which broker to ask.
    """
    bases = dict.fromkeys([tempfile.gettempdir(), "/tmp"])
    found = [
        path
        for base in bases
        for path in glob.glob(os.path.join(base, "corral-*", "broker-*.sock"))
        if is_alive(path)
    ]
    return sorted(found, key=lambda path: -os.stat(path).st_mtime)


def _no_broker_given() -> str:
    found = running_brokers()
    where = (
        "brokers answering on this machine: " + ", ".join(found)
        if found
        else "no broker answers under " + tempfile.gettempdir()
    )
    return (
        "no broker given: pass --socket PATH, or set EPHEMERAL_PIPE "
        f"(`corral run -- CMD` and the pytest plugin set it for their processes); {where}"
    )


def _with_client(args: argparse.Namespace, fn: Callable[[Client, argparse.Namespace], int]) -> int:
    if args.socket is None and not os.environ.get("EPHEMERAL_PIPE"):
        _err(_no_broker_given())
        return EXIT_UNAVAILABLE
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            return fn(client, args)
    except BrokerUnavailable as exc:
        _err(str(exc))
        return EXIT_UNAVAILABLE
    except BrokerRequestError as exc:
        _err(str(exc))
        return EXIT_REFUSED
    except BrokerError as exc:
        _err(str(exc))
        return EXIT_UNAVAILABLE


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def _ping(client: Client, args: argparse.Namespace) -> int:
    print(f"{client.ping():.3f} ms")
    return 0


def _get(client: Client, args: argparse.Namespace) -> int:
    _print_json(client.get(args.key))
    return 0


def _set(client: Client, args: argparse.Namespace) -> int:
    value: Any = args.value
    if not args.string:
        try:
            value = json.loads(args.value)
        except ValueError:
            value = args.value
    client.set(args.key, value, ttl=args.ttl)
    return 0


def _del(client: Client, args: argparse.Namespace) -> int:
    if not client.delete(args.key):
        _err(f"del: no key {args.key!r}")
        return EXIT_REFUSED
    return 0


def _keys(client: Client, args: argparse.Namespace) -> int:
    for key in sorted(client.keys()):
        print(key)
    return 0


def _stats(client: Client, args: argparse.Namespace) -> int:
    _print_json(client.stats())
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    health = client.health()
    _print_json(health)
    return 0 if health.get("status") == "healthy" else EXIT_REFUSED


def _status(client: Client, args: argparse.Namespace) -> int:
    status = client.status()
    if args.json:
        _print_json(status)
    else:
        sys.stdout.write(render_status(status))
    return 0


def _metrics(client: Client, args: argparse.Namespace) -> int:
    sys.stdout.write(client.metrics())
    return 0
