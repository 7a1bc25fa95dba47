"""Schema entries: SQL paths vs ``module:function``, resolved against the ini directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral._plugin._schema import SchemaChild
from corral._plugin._settings import (
    Settings,
    _is_callable_ref,
    _schema_entry,
    empty_schema,
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


def test_schema_source_kinds(tmp_path: Path) -> None:
    def settings(*schema: str) -> Settings:
        return Settings(None, schema, (), (), True, True, tmp_path, (tmp_path,))

    assert settings().schema_source() is empty_schema
    assert settings("/a.sql", "/b.sql").schema_source() == ["/a.sql", "/b.sql"]
    child = settings("migrations:upgrade").schema_source()
    # Run in a child process, never imported here (see test_schema_step.py).
    assert isinstance(child, SchemaChild)
    assert (child.ref, child.paths, child.timeout) == ("migrations:upgrade", (tmp_path,), 600)
