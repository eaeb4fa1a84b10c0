"""Many stored runs at once, written straight into a store's tables: for the run history's store
tests and bench/history.py, which need thousands to a million runs without submitting each."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psycopg

from warmpod.models import RunStatus

STATUSES: tuple[RunStatus, ...] = (
    "succeeded",
    "failed",
    "succeeded",
    "timeout",
    "error",
    "cancelled",
    "queued",
)
_RUN_COLUMNS = (
    "n, id, status, created, started, finished, key, environment, labels, exit_code, duration_ms, node"
)
_LABEL_COLUMNS = "run_n, name, value, owner, created"


@dataclass(frozen=True)
class Stored:
    """One run as ``fill`` stores it: ``n`` is its row number."""

    n: int
    id: str
    key: str | None
    status: RunStatus
    created: float
    environment: str
    labels: dict[str, str] = field(default_factory=dict)


def made(count: int, keys: Sequence[str | None], start: float = 1.7e9, first: int = 1) -> Iterator[Stored]:
    """``count`` runs spread over ``keys`` in turn, several created at the same instant (ties go
    by row number), of every final status and two environments, most with labels."""
    for i in range(count):
        labels = {} if i % 5 == 0 else {"team": f"t{i % 4}", "night": f"n{i % 11}"}
        if i % 7 == 0:
            labels["rare"] = "yes"
        yield Stored(
            n=first + i,
            id=f"{first + i:032x}",
            key=keys[i % len(keys)],
            status=STATUSES[i % len(STATUSES)],
            created=start + (i // 3) * 0.5,
            environment="sci" if i % 4 == 0 else "default",
            labels=labels,
        )


def _row(run: Stored) -> tuple[object, ...]:
    final = run.status != "queued"
    return (
        run.n,
        run.id,
        run.status,
        run.created,
        run.created + 0.01 if final else None,
        run.created + 0.1 if final else None,
        run.key,
        run.environment,
        msgspec.json.encode(run.labels).decode() if run.labels else None,
        (1 if run.status == "failed" else 0) if final else None,
        90.0 if final else None,
        "node-a" if final else None,
    )


def _label_rows(run: Stored) -> Iterator[tuple[object, ...]]:
    for name, value in sorted(run.labels.items()):
        yield (run.n, name, value, run.key or "", run.created)


def fill_sqlite(path: Path, runs: Iterator[Stored] | Sequence[Stored], batch: int = 50_000) -> int:
    """Write ``runs`` into the migrated SQLite store at ``path`` (a store may have it open); how many."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    count = 0
    try:
        iterator = iter(runs)
        while chunk := [run for _, run in zip(range(batch), iterator, strict=False)]:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES ({', '.join('?' * 12)})", map(_row, chunk)
            )
            db.executemany(
                f"INSERT INTO run_labels ({_LABEL_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (row for run in chunk for row in _label_rows(run)),
            )
            db.execute("COMMIT")
            count += len(chunk)
        db.execute("ANALYZE")
    finally:
        db.close()
    return count


def fill_postgres(url: str, runs: Iterator[Stored] | Sequence[Stored]) -> int:
    """Write ``runs`` into the migrated PostgreSQL store at ``url`` by COPY; how many."""
    count = 0
    with psycopg.connect(url, autocommit=True) as db:
        with db.transaction(), db.cursor() as cursor:
            labels: list[tuple[object, ...]] = []
            with cursor.copy(f"COPY runs ({_RUN_COLUMNS}) FROM STDIN") as copy:
                for run in runs:
                    copy.write_row(_row(run))
                    labels.extend(_label_rows(run))
                    count += 1
            with cursor.copy(f"COPY run_labels ({_LABEL_COLUMNS}) FROM STDIN") as copy:
                for row in labels:
                    copy.write_row(row)
            # Later adds take row numbers after these.
            cursor.execute("SELECT setval(pg_get_serial_sequence('runs', 'n'), (SELECT max(n) FROM runs))")
        db.execute("ANALYZE runs")
        db.execute("ANALYZE run_labels")
    return count
