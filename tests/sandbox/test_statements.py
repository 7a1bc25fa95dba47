"""SQL classification and splitting: pure, no database."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.sandbox._statements import Kind, classify, classify_script, split


@pytest.mark.parametrize(
    ("sql", "kind", "command"),
    [
        ("SELECT 1", Kind.OTHER, "SELECT"),
        ("  insert into t values (1)", Kind.OTHER, "INSERT"),
        ("BEGIN", Kind.BEGIN, "BEGIN"),
        ("begin work", Kind.BEGIN, "BEGIN"),
        ("BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE", Kind.BEGIN, "BEGIN"),
        ("start transaction read only", Kind.BEGIN, "BEGIN"),
        ("COMMIT", Kind.COMMIT, "COMMIT"),
        ("END", Kind.COMMIT, "END"),
        ("end transaction", Kind.COMMIT, "END"),
        ("ROLLBACK", Kind.ROLLBACK, "ROLLBACK"),
        ("ABORT WORK", Kind.ROLLBACK, "ABORT"),
        ("ROLLBACK TO SAVEPOINT a", Kind.ROLLBACK_TO, "ROLLBACK TO SAVEPOINT"),
        ("rollback work to b", Kind.ROLLBACK_TO, "ROLLBACK TO SAVEPOINT"),
        ("SAVEPOINT a", Kind.SAVEPOINT, "SAVEPOINT"),
        ("RELEASE SAVEPOINT a", Kind.RELEASE, "RELEASE SAVEPOINT"),
        ("release a", Kind.RELEASE, "RELEASE SAVEPOINT"),
        ("SET TRANSACTION READ ONLY", Kind.SET_TRANSACTION, "SET TRANSACTION"),
        ("SET search_path = x", Kind.OTHER, "SET"),
        ("VACUUM", Kind.REFUSED, "VACUUM"),
        ("VACUUM (FULL, ANALYZE) t", Kind.REFUSED, "VACUUM"),
        ("ANALYZE t", Kind.OTHER, "ANALYZE"),
        ("CREATE DATABASE x", Kind.REFUSED, "CREATE DATABASE"),
        ("DROP DATABASE IF EXISTS x", Kind.REFUSED, "DROP DATABASE"),
        ("CREATE TABLESPACE t LOCATION '/x'", Kind.REFUSED, "CREATE TABLESPACE"),
        ("CREATE INDEX CONCURRENTLY i ON t (a)", Kind.REFUSED, "CREATE INDEX CONCURRENTLY"),
        ("CREATE UNIQUE INDEX CONCURRENTLY ON t (a)", Kind.REFUSED, "CREATE INDEX CONCURRENTLY"),
        ("CREATE INDEX i ON t (a)", Kind.OTHER, "CREATE"),
        ("DROP INDEX CONCURRENTLY i", Kind.REFUSED, "DROP INDEX CONCURRENTLY"),
        ("REINDEX (VERBOSE) TABLE CONCURRENTLY t", Kind.REFUSED, "REINDEX CONCURRENTLY"),
        ("REINDEX DATABASE d", Kind.REFUSED, "REINDEX DATABASE"),
        ("REINDEX TABLE t", Kind.OTHER, "REINDEX"),
        ("ALTER SYSTEM SET work_mem = '1MB'", Kind.REFUSED, "ALTER SYSTEM"),
        ("ALTER DATABASE d SET TABLESPACE x", Kind.REFUSED, "ALTER DATABASE SET TABLESPACE"),
        ("ALTER DATABASE d SET work_mem = 1", Kind.OTHER, "ALTER"),
        ("CLUSTER", Kind.REFUSED, "CLUSTER"),
        ("CLUSTER VERBOSE", Kind.REFUSED, "CLUSTER"),
        ("CLUSTER t USING i", Kind.OTHER, "CLUSTER"),
        ("DISCARD ALL", Kind.REFUSED, "DISCARD ALL"),
        ("DISCARD PLANS", Kind.OTHER, "DISCARD"),
        ("PREPARE TRANSACTION 'x'", Kind.REFUSED, "PREPARE TRANSACTION"),
        ("PREPARE q AS SELECT 1", Kind.OTHER, "PREPARE"),
        ("COMMIT PREPARED 'x'", Kind.REFUSED, "COMMIT PREPARED"),
        ("ROLLBACK PREPARED 'x'", Kind.REFUSED, "ROLLBACK PREPARED"),
        ("CREATE SUBSCRIPTION s CONNECTION '' PUBLICATION p", Kind.REFUSED, "CREATE SUBSCRIPTION"),
        ("-- a comment\n/* a /* nested */ one */ VACUUM", Kind.REFUSED, "VACUUM"),
        ("DO $$BEGIN COMMIT; END$$", Kind.OTHER, "DO"),
        ("", Kind.OTHER, ""),
    ],
)
def test_classify(sql: str, kind: Kind, command: str) -> None:
    stmt = classify(sql)
    assert (stmt.kind, stmt.command) == (kind, command)


def test_savepoint_names_fold_like_postgres() -> None:
    assert classify("SAVEPOINT Abc").name == "abc"
    assert classify('SAVEPOINT "Abc"').name == "Abc"
    assert classify('RELEASE SAVEPOINT "a""b"').name == 'a"b'
    assert classify("ROLLBACK TO SAVEPOINT X").name == "x"
    assert classify("rollback transaction to y").name == "y"


def test_modes_and_chain() -> None:
    assert classify("BEGIN READ ONLY").read_only is True
    assert classify("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE").read_only is False
    assert classify("BEGIN").read_only is None
    assert classify("COMMIT AND CHAIN").chain
    assert not classify("COMMIT AND NO CHAIN").chain
    assert classify("ROLLBACK AND CHAIN").chain


def test_ddl_flag() -> None:
    assert classify("CREATE TABLE t (a int)").ddl
    assert classify("alter table t add constraint c unique (a) deferrable").ddl
    assert not classify("SELECT 1").ddl


@pytest.mark.parametrize(
    ("script", "parts"),
    [
        ("SELECT 1; SELECT 2", ["SELECT 1", "SELECT 2"]),
        ("SELECT ';'; SELECT 2;", ["SELECT ';'", "SELECT 2"]),
        ("SELECT 'it''s;'; x", ["SELECT 'it''s;'", "x"]),
        ("SELECT E'\\';' ; y", ["SELECT E'\\';'", "y"]),
        ('SELECT ";" FROM t; z', ['SELECT ";" FROM t', "z"]),
        ("SELECT $$;$$; SELECT $a$ $$; $a$; w", ["SELECT $$;$$", "SELECT $a$ $$; $a$", "w"]),
        ("SELECT 1 -- ;\n; v", ["SELECT 1 -- ;", "v"]),
        ("SELECT /* ; /* ; */ ; */ 1; u", ["SELECT /* ; /* ; */ ; */ 1", "u"]),
        (";;  ; SELECT 1 ;", ["SELECT 1"]),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC "
            "SELECT CASE WHEN true THEN 1 END; SELECT 2; END; COMMIT",
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC "
                "SELECT CASE WHEN true THEN 1 END; SELECT 2; END",
                "COMMIT",
            ],
        ),
        ("CREATE RULE r AS ON INSERT TO t DO ALSO (SELECT 1; SELECT 2); x", None),
    ],
)
def test_split(script: str, parts: list[str] | None) -> None:
    got = split(script)
    if parts is None:
        assert len(got) == 2
        assert got[1] == "x"
    else:
        assert got == parts


def test_classify_script_keeps_plain_scripts_whole() -> None:
    [one] = classify_script("INSERT INTO t VALUES (1); UPDATE t SET a = 2")
    assert one.kind is Kind.OTHER
    assert one.text == "INSERT INTO t VALUES (1); UPDATE t SET a = 2"
    stmts = classify_script("BEGIN; INSERT INTO t VALUES (';'); COMMIT;")
    assert [s.kind for s in stmts] == [Kind.BEGIN, Kind.OTHER, Kind.COMMIT]
    assert [s.kind for s in classify_script("SELECT 1;")] == [Kind.OTHER]
    assert [s.kind for s in classify_script("select 1; vacuum")] == [Kind.OTHER, Kind.REFUSED]


_words = st.sampled_from(["SELECT", "1", "'a;b'", '"x;y"', "$$;$$", "-- c\n", "/* ; */", "t"])


@given(st.lists(st.lists(_words, min_size=1, max_size=6), min_size=1, max_size=5))
def test_split_never_cuts_inside_quotes_or_comments(stmts: list[list[str]]) -> None:
    texts = [" ".join(words) for words in stmts]
    assert split(";\n".join(texts)) == [t.strip() for t in texts]
