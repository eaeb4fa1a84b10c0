"""Where runs are kept: one protocol, a SQLite store for one node and a PostgreSQL store for several."""
