"""``benchmarks.run_all``: benchmark output read back into tables, the page and its charts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks._report import number, parse_sections

from benchmarks import run_all

pytest.importorskip("matplotlib")

LOCK = """\
lock handoff between two processes (release -> acquire), milliseconds; holds of 2.0 ms, strict turns
  lock                                      median       p90     n  vs corral
  fcntl.flock (kernel wake-up, floor)        0.057     0.071    39       0.4x
  corral Client.lock                         0.160     0.274    39       1.0x
  filelock.FileLock (poll 50 ms)            48.608    50.806     7     303.8x
target corral median <= 0.2 ms: met (0.160 ms)
"""

ROUNDTRIP = """\
median round trip, microseconds (1 x 200 requests per cell)
client                                  ping       get       set   get p99  get ops/s
raw socket ping-pong (floor)            12.0      12.0      12.1      85.5     73,676
redis-py, unix socket                   67.4      72.0      85.8    2600.0      7,584
NDJSON, connection per request         219.7     212.5     213.3    4149.9      2,242
corral Client (persistent)              66.9      66.6      79.7    3896.7      7,200

broker memory per small item (2000 items): 682 B RSS growth, 440 B by the broker's own estimate
"""

SANDBOX = """\

Per test, empty body
  strategy                                               median    ratio     n
  bare BEGIN/ROLLBACK (empty test)                       232 us    1.00x    20
  sandbox create+close (empty test)                      341 us    1.85x    20

Per test with a 3-transaction body
  strategy                                               median    ratio     n
  bare BEGIN/ROLLBACK + body                            4866 us    1.00x    20
  sandbox + body                                        6034 us    1.22x    20
  TRUNCATE all tables + body                           16270 us    2.77x    20
  DELETE all tables + body                              6167 us    1.34x    20
  CREATE DATABASE ... TEMPLATE + body                 111329 us   22.88x     2
  schema rebuild + body                                39530 us    8.12x     2
"""

SUITE = """\
# 30 tests, 32 tables, median of 1 run(s); 2 CPUs (load average 5.8 before)
mode                                   wall s  vs TRUNCATE  vs serial corral  fixed s  ms/test
serial, TRUNCATE after each test         9.30        1.00x             0.75x     0.40   296.67
serial, corral sandbox                   6.99        1.33x             1.00x     0.40   219.67
corral -n 2                             18.50        0.50x             0.38x     0.90   586.67
corral -n 1                             13.10        0.71x             0.53x     0.70   413.33
(fixed s: the same modes on a 2-test copy of the suite; ms/test: the difference, per test)
-n 2 reaches 1.6x serial corral from: never on this machine (per test 586.67 ms parallel ...)
targets: serial corral >= 5x TRUNCATE: 1.33x; -n 2 >= 1.6x serial corral: 0.38x
"""

POSTGRES = """\
PostgreSQL postgres (PostgreSQL) 15.20 from /usr/lib/postgresql/15/bin; 2 CPUs

launcher          operation          median ms   min ms    n
corral            start (warm)           343.7    341.9    2
initdb + pg_ctl   start (cold)          2534.1   2290.3    2
clones (corral)   clone FILE_COPY         43.6     33.2    6
"""


def result(name: str, output: str, returncode: int | None = 0) -> run_all.Result:
    argv = ["python", "-m", f"benchmarks.{name}"]
    return run_all.Result(name, argv, returncode, 3.0, output, 0.5, 0.7)


def test_cells_are_read_as_numbers() -> None:
    assert number("73,676") == 73676
    assert number("1.85x") == 1.85
    assert number("232 us") == 232
    assert number("-") is None
    assert number("start (warm)") is None


def test_tables_are_read_back_with_titles_headers_and_notes() -> None:
    (lock,) = parse_sections(LOCK)
    assert lock.header == ["lock", "median", "p90", "n", "vs corral"]
    assert lock.value("median", "corral Client.lock") == 0.160
    assert lock.value("n", "filelock.FileLock (poll 50 ms)") == 7
    assert lock.notes == ["target corral median <= 0.2 ms: met (0.160 ms)"]
    empty, body = parse_sections(SANDBOX)
    assert empty.title == "Per test, empty body"
    assert body.title == "Per test with a 3-transaction body"
    assert body.value("median", "CREATE DATABASE ... TEMPLATE + body") == 111329
    (postgres,) = parse_sections(POSTGRES)
    assert postgres.label_columns == 2
    assert postgres.value("median ms", "corral", "start (warm)") == 343.7


def test_the_page_has_every_table_and_chart(tmp_path: Path) -> None:
    results = {
        "broker_roundtrip": result("broker_roundtrip", ROUNDTRIP),
        "lock_handoff": result("lock_handoff", LOCK),
        "sandbox_overhead": result("sandbox_overhead", SANDBOX),
        "suite_speed": result("suite_speed", SUITE),
        "postgres_start": result("postgres_start", POSTGRES),
        "redis_backend": result("redis_backend", "Traceback ...\nConnectionError: boom", 1),
        "torture": result("torture", "torture: 64 clients\n  lost increments (must be 0)  0"),
    }
    info = {"date": "2026-01-01 10:00 UTC", "cores": "2", "CPU": "test", "Python": "3.11",
            "PostgreSQL": "15"}  # fmt: skip
    page = run_all.render(results, info, tmp_path, quick=False).read_text()
    assert "| corral Client (persistent) | 66.9 | 66.6 | 79.7 | 3896.7 | 7,200 |" in page
    assert "corral `GET` = **0.92x** the time of redis-py" in page
    assert "`TRUNCATE all tables` costs **2.7x** the sandbox per test" in page
    # Suite rows in worker order, whatever order the benchmark ran them in.
    assert page.index("| corral -n 1 |") < page.index("| corral -n 2 |")
    assert "- -n 2 reaches 1.6x serial corral from: never on this machine" in page
    assert "| corral | start (warm) | 343.7 | 341.9 | 2 |" in page
    assert "**Not measured: the benchmark failed" in page  # the failing one says so
    assert "ConnectionError: boom" in page
    assert "## Torture: load and kill -9" in page
    assert "lost increments (must be 0)  0" in page
    for png in ("broker-roundtrip", "lock-handoff", "isolation-cost", "suite-workers"):
        path = tmp_path / f"benchmarks-{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({path.name})" in page


def test_render_only_redraws_from_the_raw_outputs(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "lock_handoff.json").write_text(json.dumps(result("lock_handoff", LOCK).__dict__))
    out = tmp_path / "docs"
    assert run_all.main(["--render-only", "--only", "lock_handoff", "--raw-dir", str(raw),
                         "--out", str(out)]) == 0  # fmt: skip
    page = (out / "benchmarks.md").read_text()
    assert "| corral Client.lock | 0.160 | 0.274 | 39 | 1.0x |" in page
    assert "Broker round trips" not in page.split("## Machine")[1]  # only what was chosen


def test_unknown_benchmark_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope", "--render-only"])
