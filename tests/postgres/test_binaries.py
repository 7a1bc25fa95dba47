"""Finding PostgreSQL's binaries: system installs newest first, explicit choices, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from corral.errors import PostgresNotFound
from corral.postgres import find_all_binaries, find_binaries
from corral.postgres._binaries import pgserver_bindir


def test_finds_a_working_installation() -> None:
    found = find_binaries()
    assert found.postgres.is_file()
    assert found.initdb.is_file()
    assert found.major >= 10
    assert "PostgreSQL" in found.version_string


def test_system_installs_come_newest_first_and_the_wheel_last() -> None:
    everything = find_all_binaries()
    system = [b for b in everything if b.source != "pgserver"]
    assert [b.version for b in system] == sorted((b.version for b in system), reverse=True)
    sources = [b.source for b in everything]
    if "pgserver" in sources:
        assert sources.index("pgserver") == len(sources) - 1


def test_explicit_bindir_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    best = find_binaries()
    monkeypatch.setenv("CORRAL_PG_BINDIR", str(best.bindir))
    found = find_binaries()
    assert found.bindir == best.bindir
    assert found.source == "CORRAL_PG_BINDIR"


def test_bindir_without_server_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_PG_BINDIR", str(tmp_path))
    with pytest.raises(PostgresNotFound, match="CORRAL_PG_BINDIR") as info:
        find_binaries()
    assert "apt-get install postgresql" in str(info.value)
    assert "corral[pgserver]" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_version_names_what_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_PG_VERSION", "99")
    installed = find_all_binaries()
    with pytest.raises(PostgresNotFound, match="PostgreSQL 99 is required") as info:
        find_binaries()
    assert f"{installed[0].major} ({installed[0].bindir})" in str(info.value)


def test_nothing_installed_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("corral.postgres._binaries.find_all_binaries", list)
    with pytest.raises(PostgresNotFound, match="no PostgreSQL server binaries found") as info:
        find_binaries()
    assert "pip install 'corral[pgserver]'" in str(info.value)


def test_pgserver_wheel_binaries_are_found_without_importing_it() -> None:
    bindir = pgserver_bindir()
    if bindir is None:
        pytest.skip("the pgserver extra is not installed")
    found = find_binaries(bindir)
    assert found.major >= 16
    assert "pgserver" not in sys.modules
