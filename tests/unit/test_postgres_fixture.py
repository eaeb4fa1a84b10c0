"""The throwaway PostgreSQL of tests/support/postgres.py: on the loopback, a fresh database per test."""

from __future__ import annotations

import psycopg
from support.postgres import PostgresServer


def test_postgres_url_answers_a_query(postgres_url: str) -> None:
    """The session's database URL takes a psycopg connection over 127.0.0.1 and answers SELECT 1."""
    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:")
    with psycopg.connect(postgres_url, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)


def test_postgres_db_is_fresh_and_empty(postgres_db: str, postgres_url: str) -> None:
    """Each postgres_db is a database of its own, with no tables, apart from the session's."""
    assert postgres_db != postgres_url
    with psycopg.connect(postgres_db, connect_timeout=10) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE scratch (n int)")


def test_postgres_db_is_dropped_after_its_test(postgres_server: PostgresServer) -> None:
    """The databases made for earlier tests are gone: only the session's and the built-in ones remain."""
    with psycopg.connect(postgres_server.url(), connect_timeout=10) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert not {name for name in names if name.startswith("t_")}, names
