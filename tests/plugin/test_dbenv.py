"""corral_database_env entries: parsing, and the parts each database hands out."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral._plugin._dbenv import (
    EnvEntry,
    EnvEntryError,
    parse_entries,
    parse_entry,
    render,
    url_parts,
)

TCP = "postgresql://postgres:s3cr%2Ft@127.0.0.1:5433/corral_run_1"


def test_a_bare_name_gets_the_whole_url() -> None:
    assert parse_entry("DATABASE_URL") == EnvEntry("DATABASE_URL", "{url}")
    assert render(TCP, parse_entries(["DATABASE_URL"]))["DATABASE_URL"] == TCP


def test_parts_for_apps_that_build_their_url() -> None:
    entries = parse_entries(
        [
            "POSTGRES_SERVER={host}",
            "POSTGRES_PORT={port}",
            "POSTGRES_USER={user}",
            "POSTGRES_PASSWORD={password}",
            "POSTGRES_DB={dbname}",
            "SQLALCHEMY_DATABASE_URI={sqlalchemy_url}",
            "ASYNC_URL={asyncpg_url}",
            "MIXED=postgresql+asyncpg://{user}@{host}:{port}/{dbname}",
        ]
    )
    env = render(TCP, entries)
    assert env["POSTGRES_SERVER"] == "127.0.0.1"
    assert env["POSTGRES_PORT"] == "5433"
    assert env["POSTGRES_USER"] == "postgres"
    assert env["POSTGRES_PASSWORD"] == "s3cr/t"
    assert env["POSTGRES_DB"] == "corral_run_1"
    assert env["SQLALCHEMY_DATABASE_URI"] == TCP.replace("postgresql:", "postgresql+psycopg:")
    assert env["ASYNC_URL"] == TCP.replace("postgresql:", "postgresql+asyncpg:")
    assert env["MIXED"] == "postgresql+asyncpg://postgres@127.0.0.1:5433/corral_run_1"


def test_libpq_variables_are_set_too() -> None:
    env = render(TCP, ())
    assert env == {
        "PGHOST": "127.0.0.1",
        "PGPORT": "5433",
        "PGUSER": "postgres",
        "PGDATABASE": "corral_run_1",
        "PGPASSWORD": "s3cr/t",
    }
    assert "PGHOST" not in render(TCP, (), libpq=False)


#: What the throwaway server hands out: a host and a port for URL parsers, the socket
#: directory in the query for libpq.
HANDED_OUT = TCP + "?host=/dev/shm/corral-pg-0/run-x1y2"


def test_parts_of_a_url_with_a_host_and_a_socket_directory() -> None:
    entries = parse_entries(["DATABASE_URL", "HOST={host}", "PORT={port}", "SA={sqlalchemy_url}"])
    env = render(HANDED_OUT, entries)
    # Apps build URLs from parts: they get the host a URL parser sees, not a directory.
    assert (env["HOST"], env["PORT"]) == ("127.0.0.1", "5433")
    assert env["DATABASE_URL"] == HANDED_OUT
    assert env["SA"] == HANDED_OUT.replace("postgresql:", "postgresql+psycopg:")
    # libpq's variables get what libpq connects to: the socket (it takes a directory).
    assert (env["PGHOST"], env["PGPORT"]) == ("/dev/shm/corral-pg-0/run-x1y2", "5433")
    assert (env["PGUSER"], env["PGDATABASE"], env["PGPASSWORD"]) == (
        "postgres",
        "corral_run_1",
        "s3cr/t",
    )


def test_a_port_in_the_query_is_the_port_for_parts_too() -> None:
    env = render("postgresql://u@db.example/x?port=6000", parse_entries(["H={host}:{port}"]))
    assert (env["H"], env["PGHOST"], env["PGPORT"]) == ("db.example:6000", "db.example", "6000")


def test_dj_database_url_reads_every_url_handed_out() -> None:
    dj_database_url = pytest.importorskip("dj_database_url")
    socket_only = "postgresql://postgres@/corral_run_1?host=/dev/shm/x&port=6000"
    for url, host, port, options in [
        (TCP, "127.0.0.1", 5433, {}),
        (HANDED_OUT, "127.0.0.1", 5433, {"host": "/dev/shm/corral-pg-0/run-x1y2"}),
        (socket_only, "", "", {"host": "/dev/shm/x", "port": 6000}),
        (
            url_parts(r"host=/dev/shm/x port=6000 dbname=corral_run_1 user=postgres")["url"],
            "",
            "",
            {"host": "/dev/shm/x", "port": 6000},
        ),
    ]:
        config = dj_database_url.parse(url)
        assert (config["HOST"], config["PORT"], config["NAME"]) == (host, port, "corral_run_1")
        assert config["ENGINE"] == "django.db.backends.postgresql"
        assert config.get("OPTIONS", {}) == options


def test_a_socket_directory_stays_in_the_query() -> None:
    parts = url_parts("postgresql://postgres@/db?host=/dev/shm/x&port=6000")
    assert parts["host"] == "/dev/shm/x"
    assert parts["port"] == "6000"
    assert parts["url"] == "postgresql://postgres@/db?host=/dev/shm/x&port=6000"


def test_libpq_key_value_strings() -> None:
    parts = url_parts(r"host=localhost user='a b' password='it\'s' dbname=x sslmode=disable")
    assert (parts["host"], parts["port"], parts["user"], parts["password"], parts["dbname"]) == (
        "localhost",
        "5432",
        "a b",
        "it's",
        "x",
    )
    assert parts["url"] == "postgresql://a%20b:it%27s@localhost/x?sslmode=disable"


def _libpq(dsn: str) -> dict[str, str]:
    """What libpq (through psycopg) makes of *dsn*; one port for all hosts spelt out."""
    from psycopg.conninfo import conninfo_to_dict

    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    hosts = params.get("host", "").split(",")
    if "," not in params.get("port", ",") and len(hosts) > 1:
        params["port"] = ",".join([params["port"]] * len(hosts))
    return params


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p@h1:5432,h2:5433/db",
        "postgresql:///db",
        "postgres://u@db/x?sslmode=require",
        "postgresql://u@/db?host=/tmp/a%20b&port=5433",
        "postgresql://u@[::1]:6000/d",
        "host=/tmp port=5433 dbname=x",
        "host=h1,h2 port=5432,5433 dbname=x user=u password='p w'",
        "host=h1,h2 port=6000 dbname=x",
        "host=::1 user=u dbname=d application_name=t",
        r"host=localhost user='a b' password='it\'s' dbname=x sslmode=disable",
    ],
)
def test_the_url_part_means_what_the_dsn_means_to_libpq(dsn: str) -> None:
    parts = url_parts(dsn)
    assert parts["url"].startswith(("postgresql://", "postgres://"))
    expected = _libpq(dsn)
    assert _libpq(parts["url"]) == expected
    for part in ("host", "user", "password", "dbname"):
        assert parts[part] == expected.get(part, "")
    assert parts["port"].split(",")[0] == str(expected.get("port", "5432")).split(",")[0]
    for scheme, part in (
        ("postgresql+psycopg", "sqlalchemy_url"),
        ("postgresql+asyncpg", "asyncpg_url"),
    ):
        assert parts[part] == scheme + parts["url"][parts["url"].index("://") :]


def test_ipv6_hosts_are_bracketed() -> None:
    assert url_parts("postgresql://u@[::1]:5432/d")["url"] == "postgresql://u@[::1]:5432/d"


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("1X", "is not an environment variable name"),
        ("X-Y={host}", "is not an environment variable name"),
        ("X={hostname}", "unknown part {hostname}; the parts are {url}, {host}"),
        ("X={host!r}", "the parts are"),
        ("X={host:>5}", "the parts are"),
        ("X=", "the parts are"),
        ("X={", "write literal braces"),
    ],
)
def test_bad_entries_say_what_is_wrong(entry: str, says: str) -> None:
    with pytest.raises(EnvEntryError, match=re.escape(says)):
        parse_entry(entry)


def test_a_variable_named_twice_is_an_error() -> None:
    with pytest.raises(EnvEntryError, match="DB is named twice"):
        parse_entries(["DB", "DB={url}"])


_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@settings(deadline=None)  # no timing in tests: a busy machine is not a failure
@given(user=_text, password=_text, dbname=_text, port=st.integers(1, 65535))
def test_the_url_part_round_trips(user: str, password: str, dbname: str, port: int) -> None:
    from urllib.parse import quote

    login = f"{quote(user, safe='')}:{quote(password, safe='')}"
    url = f"postgresql://{login}@127.0.0.1:{port}/{quote(dbname, safe='')}"
    parts = url_parts(url)
    assert (parts["user"], parts["password"], parts["dbname"], parts["port"]) == (
        user,
        password,
        dbname,
        str(port),
    )
    assert url_parts(parts["url"]) == parts
