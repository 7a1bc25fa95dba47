"""The supported versions: pyproject's lower bounds, the lowest-versions constraints file
pinning each, the table of the packages corral checks at run time (``corral._versions``)
agreeing with both, and the one-line refusal of older ones.

pytest and pytest-asyncio have two floors: the plugin's (``FLOORS``, checked at run time;
tests/plugin/test_floors.py runs an app's suite there) and the test suite's
(``SUITE_FLOORS``: pyproject's ``[dev]`` bounds, the lowest-versions run's pins).
"""

from __future__ import annotations

import re
import textwrap
import tomllib
from pathlib import Path

import pytest

from corral import _versions
from corral._versions import (
    ASYNCIO_GLUE,
    FLOORS,
    SUITE_FLOORS,
    check_floors,
    release,
    too_old,
)
from tests._inner import RUN_VARIABLES

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _extras() -> dict[str, list[str]]:
    """pyproject's extras: name -> requirements."""
    extras: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    return extras


def _lower_bounds() -> dict[str, str]:
    """pyproject's lower bound of each package its extras name (one per package)."""
    bounds: dict[str, set[str]] = {}
    for extra in _extras().values():
        for requirement in extra:
            if requirement.startswith("corral["):
                continue
            match = re.search(r">=\s*([^,;\s]+)", requirement)
            assert match, f"{requirement!r} has no lower bound"
            bounds.setdefault(_name(requirement), set()).add(match.group(1))
    several = {name: versions for name, versions in bounds.items() if len(versions) > 1}
    assert not several, f"pyproject names these with different lower bounds: {several}"
    return {name: versions.pop() for name, versions in bounds.items()}


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / ".ci" / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints-lowest.txt: {line!r} is not a pin"
            pins[_name(name)] = version.strip()
    return pins


def test_pyproject_lower_bounds_are_the_floors() -> None:
    bounds = _lower_bounds()
    floors = {**FLOORS, **SUITE_FLOORS}
    assert {name: bounds.get(name) for name in floors} == floors


def test_corral_checks_every_driver_and_plugin_it_integrates_with() -> None:
    # A package of a driver extra, or a plugin corral's glue runs with, left out of FLOORS
    # would lose its one-line refusal of an older version.
    extras = _extras()
    drivers = {
        _name(r) for extra in ("psycopg", "asyncpg", "sqlalchemy", "redis") for r in extras[extra]
    }
    assert set(FLOORS) == drivers | {"pytest", "pytest-asyncio", "pytest-xdist", "anyio"}


def test_constraints_file_pins_every_floor() -> None:
    # The bench extra (matplotlib) is the one exception: the floor run installs
    # [dev,pgserver], the newest run the newest matplotlib.
    bounds = {name: v for name, v in _lower_bounds().items() if name != "matplotlib"}
    assert _constraints() == {**bounds, "psycopg-binary": FLOORS["psycopg"]}


def test_the_suite_floors_are_at_or_above_the_plugin_floors() -> None:
    assert set(SUITE_FLOORS) == {"pytest", "pytest-asyncio"}
    for name, version in SUITE_FLOORS.items():
        assert release(version) >= release(FLOORS[name])
    # Below loop_scope the plugin degrades; the suite's own tests use it.
    assert release(FLOORS["pytest-asyncio"]) < release(ASYNCIO_GLUE)
    assert release(ASYNCIO_GLUE) <= release(SUITE_FLOORS["pytest-asyncio"])


def test_the_floor_table_in_the_docs_names_both_floors() -> None:
    text = (ROOT / "docs" / "adopting.md").read_text()
    for name in SUITE_FLOORS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        lowest = row.split("|")[2]
        assert lowest.strip() == f"{FLOORS[name]} (suite: {SUITE_FLOORS[name]})", row


def test_release_numbers() -> None:
    assert release("0.21.0") < release("0.24.0") == release("0.24")
    assert release("1.4.1.post1") == release("1.4.1")
    assert release("2.1.0b1") == release("2.1.0")
    assert release("0.9") < release("0.10") < release("1")
    assert release("4.0.0rc1") >= release("4.0.0")  # a pre-release of the floor is let in


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_each_floor_refuses_an_older_version_in_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    floor = FLOORS[name]
    older = ".".join(str(max(0, n - 1)) if i == 1 else str(n) for i, n in enumerate(release(floor)))
    if release(older) >= release(floor):  # x.0.y: step the major back instead
        older = f"{release(floor)[0] - 1}.99"
    monkeypatch.setattr(_versions, "installed", lambda dist: older if dist == name else None)
    expected = f"corral: {name} {older} is too old (corral needs >= {floor})"
    assert too_old(name, floor) == expected
    assert check_floors() == expected
    monkeypatch.setattr(_versions, "installed", lambda dist: floor if dist == name else None)
    assert check_floors() is None


def test_several_too_old_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    old = {"asyncpg": "0.25.0", "redis": "4.6.0"}
    monkeypatch.setattr(_versions, "installed", old.get)
    assert check_floors() == (
        "corral: asyncpg 0.25.0 is too old (corral needs >= 0.27.0); "
        "redis 4.6.0 is too old (corral needs >= 5.0.0)"
    )


def test_an_installed_old_version_is_a_usage_error_not_a_traceback(
    pytester: pytest.Pytester,
) -> None:
    # A fake distribution ahead of the real one on sys.path: what importlib.metadata (and
    # pip) see as the installed version.
    fake = pytester.path / "fake-site"
    info = fake / "pytest_asyncio-0.19.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytest-asyncio\nVersion: 0.19.0\n")
    monkeypatch = pytest.MonkeyPatch()
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    pytester.makeini(textwrap.dedent("[pytest]\ncorral_sandbox = false\n"))
    try:
        # Under xdist our own worker's variables would make the inner run a "worker",
        # which leaves the floors to its controller.
        for name in RUN_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("PYTHONPATH", str(fake), prepend=":")
        result = pytester.runpytest_subprocess("-p", "no:randomly")
    finally:
        monkeypatch.undo()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    floor = FLOORS["pytest-asyncio"]
    expected = f"ERROR: corral: pytest-asyncio 0.19.0 is too old (corral needs >= {floor})"
    assert result.stderr.lines[0] == expected
    assert "Traceback" not in result.stderr.str()
    assert not [line for line in result.stderr.lines[1:] if line.strip()]
