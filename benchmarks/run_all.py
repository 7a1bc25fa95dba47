"""Run every benchmark and write ``docs/benchmarks.md`` with its charts.

Run: ``python -m benchmarks.run_all [--quick] [--only NAME,...] [--render-only]``.
Each benchmark runs as ``python -m benchmarks.NAME`` in its own process, one after the
other (so they never compete for the CPU); its printed tables are parsed back
(``benchmarks/_report.py``), rendered as Markdown tables with the machine, versions and
date, and drawn as PNG charts next to the page. Raw outputs are kept in ``--raw-dir``
(default ``$XDG_CACHE_HOME/corral/benchmarks``) so ``--render-only`` redraws without
measuring again. A benchmark that fails is reported as failed, with its output's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks import _report
from benchmarks._report import find, markdown_table, number, parse_sections

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    timeout: float = 1200.0


SPECS = (
    Spec(
        "broker_roundtrip",
        "Broker round trips",
        (),
        ("--ops", "1000", "--rounds", "2", "--items", "10000"),
    ),
    Spec(
        "lock_handoff",
        "Lock handoff between processes",
        (),
        ("--handoffs", "60", "--polling-handoffs", "10"),
    ),
    Spec(
        "sandbox_overhead", "Per-test isolation cost", (), ("--rounds", "60", "--slow-rounds", "5")
    ),
    # -n 2 first: suite_speed checks its target (>= 1.6x serial) against the first -n value.
    Spec(
        "suite_speed",
        "Suite wall time vs workers",
        # 3 rounds: a single run's per-test figures (wall minus fixed cost) are noisy.
        ("--workers", "2,1,4", "--rounds", "3"),
        ("--tests", "150", "--workers", "2,1,4"),
    ),
    Spec("postgres_start", "Throwaway PostgreSQL", (), ("--rounds", "3")),
    Spec("plugin_overhead", "The plugin in a run without a database", (), ("--rounds", "3")),
    Spec(
        "redis_backend",
        "The Redis backend",
        (),
        ("--ops", "500", "--rounds", "1", "--handoffs", "60"),
    ),
    Spec(
        "torture",
        "Torture: load and kill -9",
        ("--clients", "64", "--seconds", "5", "--epochs", "2", "--kills", "6"),
        ("--clients", "16", "--seconds", "2", "--epochs", "2", "--kills", "2"),
    ),
)


@dataclass
class Result:
    name: str
    argv: list[str]
    returncode: int | None  # None: timed out
    seconds: float
    output: str
    load_before: float
    load_after: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(spec: Spec, quick: bool, raw_dir: Path) -> Result:
    args = list(spec.quick if quick else spec.full)
    argv = [sys.executable, "-m", f"benchmarks.{spec.name}", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPHEMERAL_", "PYTEST_"))}
    print(f"running {' '.join(['python', *argv[1:]])} ...", flush=True)
    load_before = _report.load_average()
    started = time.perf_counter()
    try:
        done = subprocess.run(
            argv,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=spec.timeout,
            check=False,
        )
        returncode: int | None = done.returncode
        output = done.stdout + (f"\n[stderr]\n{done.stderr}" if done.stderr.strip() else "")
    except subprocess.TimeoutExpired as exc:
        returncode = None
        output = _text(exc.stdout) + _text(exc.stderr) + f"\n[timed out after {spec.timeout:g} s]"
    result = Result(
        spec.name,
        ["python", "-m", f"benchmarks.{spec.name}", *args],
        returncode,
        time.perf_counter() - started,
        output,
        load_before,
        _report.load_average(),
    )
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / f"{spec.name}.json").write_text(json.dumps(result.__dict__, indent=1))
    status = "ok" if result.ok else f"FAILED ({returncode})"
    print(f"  {status} in {result.seconds:.0f} s", flush=True)
    return result


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def load(name: str, raw_dir: Path) -> Result | None:
    path = raw_dir / f"{name}.json"
    if not path.exists():
        return None
    return Result(**json.loads(path.read_text()))


# ---------------------------------------------------------------------- rendering


class Page:
    """The Markdown page under construction, and the charts it refers to."""

    def __init__(self, out_dir: Path, subtitle: str) -> None:
        self.out_dir = out_dir
        self.subtitle = subtitle
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text.strip("\n") + "\n")

    def chart(self, name: str, draw: Callable[[Path], Path], alt: str) -> None:
        path = draw(self.out_dir / name)
        self.add(f"![{alt}]({path.name})")


def _how(result: Result) -> str:
    code = (
        "ok"
        if result.ok
        else ("timed out" if result.returncode is None else f"exit code {result.returncode}")
    )
    return (
        f"`{' '.join(result.argv)}` — {result.seconds:.0f} s, {code}; load average "
        f"{result.load_before:.1f} before, {result.load_after:.1f} after."
    )


def _raw(result: Result, summary: str = "Raw output") -> str:
    text = result.output.strip()
    return f"<details><summary>{summary}</summary>\n\n```text\n{text}\n```\n\n</details>"


def _failed(page: Page, result: Result | None, why: str = "") -> None:
    if result is None:
        page.add("_Not measured in this run._")
        return
    tail = "\n".join(result.output.strip().splitlines()[-25:])
    page.add(f"**Not measured: the benchmark failed{why}.** {_how(result)}")
    page.add(f"```text\n{tail}\n```")


def render_roundtrip(page: Page, result: Result) -> None:
    table = find(parse_sections(result.output), header="get")
    if table is None:
        _failed(page, result, " (no table in its output)")
        return
    page.add(
        "Sequential requests from a separate process, each server in its own process, rounds "
        "interleaved. The floor is a blocking Unix-socket ping-pong with no parsing; the "
        "polling floor is the same with both sides busy-polling for up to 50 µs before they "
        "sleep, as corral's client and broker do across processes (`CORRAL_SPIN_US=0` turns "
        'it off: the "polling off" row); "connection per request" is how the Node client '
        "talks to its broker; redis-py talks to a redis-server on a Unix socket. Median "
        "microseconds per request."
    )
    page.add(markdown_table(table))
    corral = table.value("get", "corral Client (persistent)")
    lines = []
    for label, what in (
        ("redis-py, unix socket", "redis-py"),
        ("NDJSON, connection per request", "a connection per request"),
        ("raw socket ping-pong (floor)", "the blocking floor"),
        ("raw ping-pong, both sides polling", "the polling floor (like for like)"),
    ):
        other = table.value("get", label)
        if corral and other:
            lines.append(f"- corral `GET` = **{corral / other:.2f}x** the time of {what}")
    page.add("\n".join(lines))
    page.add("Where the time goes: [the broker's speed notes](broker.md#speed).")
    memory = next((n for n in table.notes if "memory per small item" in n), None)
    if memory:
        page.add(memory[0].upper() + memory[1:] + ".")
    rows = [(r[0], number(r[table.header.index("get")])) for r in table.rows]
    labels = [label for label, value in rows if value is not None]
    values = [value for _, value in rows if value is not None]
    page.chart(
        "benchmarks-broker-roundtrip.png",
        lambda p: _report.barh(
            p, labels, values, title="Broker round trip: one GET from another process",
            xlabel="median microseconds per request (lower is better)",
            subtitle=page.subtitle, fmt="{:.1f} µs",
        ),
        "Bar chart: median GET round trip in microseconds per client",
    )  # fmt: skip


def render_lock(page: Page, result: Result) -> None:
    table = find(parse_sections(result.output), header="median")
    if table is None:
        _failed(page, result, " (no table in its output)")
        return
    page.add(
        "Two processes take strict turns on one lock; each holds it 2 ms so the other is "
        "surely waiting, stamps the time and releases. The number is how long after the "
        "release the other process had the lock. `flock` (the kernel wakes the waiter) is "
        "the floor; `filelock` and redis-py's `Lock` poll. Milliseconds."
    )
    page.add(markdown_table(table))
    labels = [row[0] for row in table.rows]
    values = [table.value("median", label) or 0.0 for label in labels]
    page.chart(
        "benchmarks-lock-handoff.png",
        lambda p: _report.barh(
            p, labels, values, title="Lock handoff between two processes (release → acquire)",
            xlabel="median milliseconds, log scale (lower is better)",
            subtitle=page.subtitle, log=True, fmt="{:.3g} ms",
        ),
        "Bar chart, log scale: median lock handoff in milliseconds per lock",
    )  # fmt: skip
    page.add("\n".join(f"- {note}" for note in table.notes))


def render_isolation(page: Page, result: Result) -> None:
    sections = parse_sections(result.output)
    main = find(sections, title="3-transaction body")
    if main is None:
        _failed(page, result, " (no per-test table in its output)")
        return
    page.add(
        "What it costs to give each test a clean database, per test, measured in one process "
        "against one server in alternating blocks (so drift in machine load hits every "
        "strategy alike). Each test runs the same body (three small app transactions); the "
        "strategies are: corral's sandbox (one rolled-back transaction), a bare "
        "`BEGIN`/`ROLLBACK` on one connection (the floor), `TRUNCATE` or `DELETE` of every "
        "table after the test (database-cleaner style), a fresh `CREATE DATABASE ... TEMPLATE` "
        "per test (pytest-postgresql style), and dropping and recreating the schema. Ratios "
        "are against the floor, block by block."
    )
    page.add(markdown_table(main))
    labels = [row[0] for row in main.rows]
    values = [(main.value("median", label) or 0.0) / 1000 for label in labels]
    page.chart(
        "benchmarks-isolation-cost.png",
        lambda p: _report.barh(
            p, labels, values, title="Per-test isolation cost (same body, same server)",
            xlabel="median milliseconds per test, log scale (lower is better)",
            subtitle=page.subtitle, log=True, highlight="sandbox", fmt="{:.3g} ms",
        ),
        "Bar chart, log scale: milliseconds per test for each isolation strategy",
    )  # fmt: skip
    sandbox = main.value("median", "sandbox + body")
    lines = []
    for label in ("TRUNCATE all tables + body", "DELETE all tables + body",
                  "CREATE DATABASE ... TEMPLATE + body", "schema rebuild + body"):  # fmt: skip
        other = main.value("median", label)
        if sandbox and other:
            lines.append(
                f"- `{label.removesuffix(' + body')}` costs **{other / sandbox:.1f}x** "
                "the sandbox per test"
            )
    page.add("\n".join(lines))
    page.add("What each row costs and why: [the sandbox's speed notes](sandbox.md#speed).")
    rest = [s for s in sections if s is not main and s.header]
    if rest:
        page.add("The other tables of the same run (empty tests, app transactions, other drivers):")
        for section in rest:
            page.add(f"**{section.title}**\n\n{markdown_table(section)}")


def render_suite(page: Page, result: Result) -> None:
    sections = parse_sections(result.output)
    table = find(sections, header="wall s")
    if table is None:
        _failed(page, result, " (no table in its output)")
        return
    heading = next((line[2:] for line in result.output.splitlines() if line.startswith("# ")), "")
    page.add(
        "Whole `pytest` runs of a generated blog suite (each test signs two users up, publishes "
        "a tagged post, comments and reads a feed: 15 statements; a truncating suite truncates "
        "every table of the schema) on one throwaway server, each run in a fresh process: serially "
        "with a `TRUNCATE` of every table after each test, serially under corral, and under "
        f"corral with xdist workers. {heading}."
    )

    # serial rows first, then by worker count (the benchmark runs -n 2 first for its target)
    def order(row: list[str]) -> tuple[bool, float, bool]:
        workers = re.search(r"-n (\d+)", row[0])
        return (workers is not None, float(workers.group(1)) if workers else 0.0, " on" in row[0])

    table.rows.sort(key=order)
    page.add(markdown_table(table))
    labels = [row[0] for row in table.rows]
    values = [table.value("wall s", label) or 0.0 for label in labels]
    short = [
        label.replace("serial, TRUNCATE after each test", "serial\nTRUNCATE")
        .replace("serial, corral sandbox", "serial\ncorral")
        .replace("serial, corral, ", "serial corral\n")
        .replace(", colocate on", "\ncolocate on")
        .replace(", gc freeze on", "\ngc freeze on")
        .replace("corral -n ", "corral\n-n ")
        for label in labels
    ]
    truncate = table.value("wall s", "serial, TRUNCATE after each test")
    page.chart(
        "benchmarks-suite-workers.png",
        lambda p: _report.bars(
            p, short, values, title="Suite wall time vs workers",
            ylabel="wall time of the whole run, seconds (lower is better)",
            xlabel="how the suite ran", subtitle=page.subtitle,
            reference=("serial TRUNCATE", truncate) if truncate else None,
        ),
        "Bar chart: wall time of the whole suite in seconds, serially and with xdist workers",
    )  # fmt: skip
    wanted = ("targets", "-n ", "(fixed s")
    page.add("\n".join(f"- {note}" for note in table.notes if note.startswith(wanted)))
    page.add(
        "Each xdist worker pays a start-up cost (Python, pytest and its plugins, its own "
        "clone) and xdist's per-test reports to the controller, on the same cores the "
        "database server uses, so workers pay off on long suites and on machines with more "
        "cores than the database needs; see [the plugin's numbers](pytest.md#numbers) for "
        "longer suites."
    )


def _table_and_notes(page: Page, result: Result, header: str, intro: str) -> None:
    """*intro*, then the table with the column *header*, then the lines around it."""
    table = find(parse_sections(result.output), header=header)
    if table is None:
        _failed(page, result, " (no table in its output)")
        return
    page.add(intro)
    page.add(markdown_table(table))
    page.add("\n".join(f"- {note}" for note in table.notes))


def render_postgres(page: Page, result: Result) -> None:
    first = result.output.strip().splitlines()[0]
    _table_and_notes(
        page,
        result,
        "median ms",
        "Starting and stopping a throwaway server (corral's cached-initdb copy vs a plain "
        "`initdb` + `pg_ctl start -w`), and cloning a template database, in milliseconds. "
        f"{first}.",
    )


def render_overhead(page: Page, result: Result) -> None:
    heading = next((line[2:] for line in result.output.splitlines() if line.startswith("# ")), "")
    _table_and_notes(
        page,
        result,
        "difference ms",
        "What the plugin adds to a pytest run that configured nothing of it (a one-test "
        "suite, no database, no Redis), since it is active in every run of a virtualenv "
        "where corral is installed: whole runs with the plugin and with `-p no:corral`, "
        "interleaved, serially and under xdist, without a bytecode cache "
        "(`PYTHONDONTWRITEBYTECODE=1`, common in Docker images) and with one; CPU time of "
        "the whole run and of each process, the least of the rounds on each side (load "
        "only adds to it). "
        f"{heading[:1].upper() + heading[1:]}.",
    )


def render_redis(page: Page, result: Result) -> None:
    page.add(
        "corral's Redis backend (for runs sharded over machines) next to redis-py's plain "
        "commands and the socket broker: round trips, the Lua scripts' cost inside Redis, "
        "and lock handoff. Its own output, as printed:"
    )
    page.add(f"```text\n{result.output.strip()}\n```")


def render_torture(page: Page, result: Result) -> None:
    page.add(
        "64 client processes loop over `incr`, `lock` (one of four names; some holds last "
        "200 ms), `acquire` from a pool, `once` and `set`+`get` against a broker in its own "
        "process; lock holders are killed with SIGKILL mid-hold, and between epochs the "
        "broker itself is killed and restarted at the same path. *Time to free* runs from a "
        "holder's kill until another client is granted its lock. Lost increments, duplicate "
        "fencing tokens and `once` disagreements must be 0 (the benchmark exits 1 otherwise). "
        "Its own output, as printed:"
    )
    page.add(f"```text\n{result.output.strip()}\n```")


RENDERERS: dict[str, Callable[[Page, Result], None]] = {
    "broker_roundtrip": render_roundtrip,
    "lock_handoff": render_lock,
    "sandbox_overhead": render_isolation,
    "suite_speed": render_suite,
    "postgres_start": render_postgres,
    "plugin_overhead": render_overhead,
    "redis_backend": render_redis,
    "torture": render_torture,
}


def render(
    results: Mapping[str, Result | None],
    info: Mapping[str, str],
    out: Path,
    quick: bool,
    note: str = "",
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subtitle = (
        f"{info['date']} · {info['cores']} cores ({info['CPU']}) · Python {info['Python']}"
        f" · {info['PostgreSQL']}"
    )
    page = Page(out, subtitle)
    page.add("# Benchmarks")
    page.add(
        "Every number below was measured side by side on one machine, by one command:\n\n"
        "```console\npip install -e '.[dev,bench]'\npython -m benchmarks.run_all"
        + (" --quick" if quick else "")
        + "\n```\n\n"
        "It runs each `benchmarks/NAME.py` in turn (each is also runnable alone, "
        "`python -m benchmarks.NAME --help`) and rewrites this page and its charts. "
        "Generated — do not edit by hand."
        + (" **This run used `--quick` (fewer rounds): expect more noise.**" if quick else "")
    )
    page.add(
        "## Machine\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in info.items())
    )
    page.add(
        (f"{note} " if note else "")
        + "Anything else running on the machine competes for the same cores; the load "
        "averages beside each benchmark say how busy it was. Ratios measured within one "
        "benchmark (same process, alternating rounds) are more trustworthy than absolute "
        "times."
    )
    contents = " · ".join(
        f"[{spec.title}](#{_anchor(spec.title)})" for spec in SPECS if spec.name in results
    )
    page.add(contents)
    for spec in SPECS:
        if spec.name not in results:
            continue
        page.add(f"## {spec.title}")
        result = results[spec.name]
        if result is None or not result.ok:
            _failed(page, result)
            continue
        page.add(_how(result))
        try:
            RENDERERS[spec.name](page, result)
        except Exception as exc:  # a format change in a benchmark must not lose the rest
            page.add(f"_Could not read this benchmark's tables ({type(exc).__name__}: {exc})._")
        page.add(_raw(result))
    path = out / "benchmarks.md"
    path.write_text("\n".join(page.parts))
    return path


def _anchor(title: str) -> str:
    return "".join(c for c in title.lower() if c.isalnum() or c in " -").replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a quick look")
    parser.add_argument(
        "--only", help="comma-separated benchmark names (others are left out of the page)"
    )
    parser.add_argument(
        "--render-only", action="store_true", help="redraw from the raw outputs of the last run"
    )
    parser.add_argument("--note", default="", help="a sentence about the machine for the page")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="where benchmarks.md and the PNGs go"
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "corral" / "benchmarks"
    parser.add_argument(
        "--raw-dir", type=Path, default=cache, help="raw outputs (default %(default)s)"
    )
    args = parser.parse_args(argv)  # fmt: skip
    names = [s.name for s in SPECS]
    chosen = names if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {names}")
    machine_file = args.raw_dir / "machine.json"
    if args.render_only and machine_file.exists():
        info = json.loads(machine_file.read_text())
    else:
        info = _report.machine()
        args.raw_dir.mkdir(parents=True, exist_ok=True)
        machine_file.write_text(json.dumps(info, indent=1))
    results: dict[str, Result | None] = {}
    for spec in SPECS:
        if spec.name not in chosen:
            continue
        results[spec.name] = (
            load(spec.name, args.raw_dir)
            if args.render_only
            else run(spec, args.quick, args.raw_dir)
        )
    quick = args.quick
    if args.render_only:  # say --quick if the measurements were made with it
        quick = any(r is not None and r.argv[3:] == list(_spec(r.name).quick)
                    for r in results.values())  # fmt: skip
    path = render(results, info, args.out, quick, args.note)
    print(f"wrote {path} and its charts")
    failed = [name for name, r in results.items() if r is None or not r.ok]
    if failed:
        print(f"failed or missing: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _spec(name: str) -> Spec:
    return next(spec for spec in SPECS if spec.name == name)


if __name__ == "__main__":
    raise SystemExit(main())
