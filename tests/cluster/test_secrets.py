"""Secrets on a PostgreSQL queue: the value is read by the node that runs the run, and never stored."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
from support.live import WarmpodServer
from support.postgres import PostgresServer

from .nodes import node_settings, run

SECRET = "pg-Warehouse-Password-73d1"


def test_no_secret_is_at_rest_in_the_database(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """A run that asked for a secret and printed it leaves the value in no table (the queued run
    held its name only), nor in the node's log; the program got it, and its output shows ***."""
    url = postgres_server.create_database("secrets")
    secrets = tmp_path / "secrets"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"WAREHOUSE_PASSWORD={SECRET}\n")
    settings = {**node_settings(url, "node-s"), "WARMPOD_SERVER__SECRETS_FILE": str(secrets)}
    node = WarmpodServer(tmp_path, settings)
    try:
        node.wait_healthy()
        code = "import os\nv = os.environ['WAREHOUSE_PASSWORD']\nprint(v, len(v))\n"
        result = run(node, code, secrets=["WAREHOUSE_PASSWORD"])
        assert result["stdout"] == f"*** {len(SECRET)}\n", result
        with psycopg.connect(url) as db:
            tables = [
                row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ]
            assert "runs" in tables
            for table in tables:
                # Every column of every row as text (bytea as hex, so also as the value's hex).
                rows = db.execute(f'SELECT t::text FROM "{table}" t').fetchall()
                dump = "\n".join(row[0] for row in rows)
                assert SECRET not in dump, table
                assert SECRET.encode().hex() not in dump, table
        assert SECRET not in node.log_path.read_text(errors="replace")
    finally:
        node.close()
