"""Schema entries: SQL paths vs ``module:function``, resolved against the ini directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from corral._plugin._settings import (
    Settings,
    _is_callable_ref,
    _schema_entry,
    empty_schema,
    load_schema_callable,
)


@pytest.mark.parametrize(
    ("entry", "is_callable"),
    [
        ("migrations:upgrade", True),
        ("pkg.sub.migrations:upgrade", True),
        ("schema.sql", False),
        ("db/schema.sql", False),
        ("db/", False),
        ("C:schema.sql", False),
        ("not a module:upgrade", False),
        ("mod:not-a-function", False),
    ],
)
def test_callable_refs_are_told_from_paths(entry: str, is_callable: bool) -> None:
    assert _is_callable_ref(entry) is is_callable


def test_paths_resolve_against_the_ini_directory(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "schema.sql").write_text("SELECT 1;")
    assert _schema_entry("db/schema.sql", tmp_path) == str(tmp_path / "db" / "schema.sql")
    assert _schema_entry(" db ", tmp_path) == str(tmp_path / "db")
    with pytest.raises(pytest.UsageError, match=r"'missing\.sql' does not exist"):
        _schema_entry("missing.sql", tmp_path)


def test_callable_is_imported_from_the_ini_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "corral_settings_probe.py").write_text("def upgrade(dsn):\n    return dsn\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    fn = load_schema_callable("corral_settings_probe:upgrade", [tmp_path])
    assert fn("x") == "x"
    with pytest.raises(pytest.UsageError, match="has no function 'missing'"):
        load_schema_callable("corral_settings_probe:missing", [tmp_path])
    with pytest.raises(pytest.UsageError, match="cannot import 'no_such_module_x'"):
        load_schema_callable("no_such_module_x:f", [tmp_path])
    sys.modules.pop("corral_settings_probe", None)


def test_callable_module_failing_at_import_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The common case: the module reads its URL at import, before corral has set it.
    (tmp_path / "corral_settings_env_probe.py").write_text(
        "import os\nURL = os.environ['CORRAL_SETTINGS_PROBE_URL']\ndef upgrade(dsn):\n    pass\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("CORRAL_SETTINGS_PROBE_URL", raising=False)
    with pytest.raises(pytest.UsageError) as info:
        load_schema_callable("corral_settings_env_probe:upgrade", [tmp_path])
    message = str(info.value)
    assert "raised KeyError: 'CORRAL_SETTINGS_PROBE_URL'" in message
    assert "not at import time" in message
    sys.modules.pop("corral_settings_env_probe", None)


def test_schema_source_kinds(tmp_path: Path) -> None:
    def settings(*schema: str) -> Settings:
        return Settings(None, schema, (), (), True, True, tmp_path, (tmp_path,))

    assert settings().schema_source() is empty_schema
    assert settings("/a.sql", "/b.sql").schema_source() == ["/a.sql", "/b.sql"]
