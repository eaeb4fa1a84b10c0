"""The run history query both stores answer ``list_runs`` with: one statement, every filter on an index."""

from __future__ import annotations

from warmpod.queue.store.base import Position, RunFilter

COLUMNS = (
    "r.id, r.status, r.created, r.started, r.finished, r.environment, r.labels, r.exit_code, "
    "r.duration_ms, r.node, r.n"
)
"""What a listed run is read from, in ``base.summary``'s order."""

# The indexes the query walks, newest first, each from the key's own range: a key's runs by time
# (runs_history), by status and time (runs_history_by_status), and by one label and time
# (run_labels_by_value, whose rows carry their run's key and time for that). The key is
# ``coalesce(key, '')``, as in runs_by_idempotency_key: runs submitted with keys off are one key's.
# Other filters (more statuses, more labels, the environment, the other label) are checked on
# the rows the index gives; a page stops at ``limit`` of them.


def history_query(
    key: str | None, where: RunFilter, after: Position | None, limit: int
) -> tuple[str, list[object]]:
    """The statement (``?`` placeholders) and its parameters that list ``key``'s runs as
    ``Store.list_runs`` says; a store swaps the placeholders for its own."""
    params: list[object] = [key or ""]
    rest = where.labels
    if where.labels:
        (name, value), rest = where.labels[0], where.labels[1:]
        # Driven by the label's index: the runs are joined by their row number, one each.
        query = (
            f"SELECT {COLUMNS} FROM run_labels l JOIN runs r ON r.n = l.run_n "  # noqa: S608  (constants only)
            "WHERE l.owner = ? AND l.name = ? AND l.value = ?"
        )
        params += [name, value]
        created, n = "l.created", "l.run_n"
    else:
        query = f"SELECT {COLUMNS} FROM runs r WHERE coalesce(r.key, '') = ?"  # noqa: S608  (constants only)
        created, n = "r.created", "r.n"
    for name, value in rest:
        query += " AND EXISTS (SELECT 1 FROM run_labels m WHERE m.run_n = r.n AND m.name = ? AND m.value = ?)"
        params += [name, value]
    if len(where.statuses) == 1:
        query += " AND r.status = ?"
        params.append(where.statuses[0])
    elif where.statuses:
        query += f" AND r.status IN ({', '.join('?' * len(where.statuses))})"
        params += where.statuses
    if where.environment is not None:
        query += " AND r.environment = ?"
        params.append(where.environment)
    if where.since is not None:
        query += f" AND {created} >= ?"
        params.append(where.since)
    if where.until is not None:
        query += f" AND {created} < ?"
        params.append(where.until)
    if after is not None:
        # A row value: both stores take it as one range of the index, not a filter.
        query += f" AND ({created}, {n}) < (?, ?)"
        params += [after.created, after.n]
    query += f" ORDER BY {created} DESC, {n} DESC LIMIT ?"
    params.append(limit)
    return query, params
