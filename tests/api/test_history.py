"""Labels on submits and ``GET /runs`` on the real app (keys off: every run is one key's)."""

from __future__ import annotations

from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import PROBLEMS, assert_problem

from warmpod.http.history import encode_cursor
from warmpod.queue.store.base import Position


async def test_labels_are_kept_returned_and_filterable(client: AsyncTestClient[Litestar]) -> None:
    """Labels sent as JSON and as repeated form fields come back in the result and in /runs,
    where a label filter picks the runs that carry it, newest first."""
    labels = {"team": "sales", "night": "2026-11-03"}
    first = await client.post("/run-json/", json={"code": "print(1)", "labels": labels})
    assert first.status_code == 200, first.text
    assert first.json()["labels"] == labels
    form = {"label": ["team=ops", "night=2026-11-03"]}
    second = await client.post("/run-file/", files={"file": ("main.py", b"pass\n")}, data=form)
    assert second.status_code == 200, second.text
    assert second.json()["labels"] == {"team": "ops", "night": "2026-11-03"}
    status = await client.get(f"/status/{first.json()['id']}")
    assert status.json()["labels"] == labels
    page = (await client.get("/runs")).json()
    assert [run["id"] for run in page["runs"]] == [second.json()["id"], first.json()["id"]]
    assert page["next"] is None
    fields = "id status created started finished environment labels exit_code duration_ms node"
    assert set(page["runs"][0]) == set(fields.split())
    picked = (await client.get("/runs", params={"label": "team=sales"})).json()
    assert [run["id"] for run in picked["runs"]] == [first.json()["id"]]
    both = await client.get("/runs", params=[("label", "night=2026-11-03"), ("label", "team=ops")])
    assert [run["id"] for run in both.json()["runs"]] == [second.json()["id"]]


async def test_labels_that_break_a_rule_are_a_422_naming_it(client: AsyncTestClient[Litestar]) -> None:
    """Too many labels, a name out of its alphabet or too long, a value too long or not printable,
    a form part without '=': each is a `label` problem that names the rule; nothing runs."""
    cases = [
        ({f"k{i}": "v" for i in range(17)}, "at most 16"),
        ({"Team": "x"}, "a-z"),
        ({"-team": "x"}, "starting with"),
        ({"k" * 64: "x"}, "1-63"),
        ({"team": "x" * 257}, "at most 256"),
        ({"team": "a\nb"}, "printable"),
    ]
    for labels, words in cases:
        response = await client.post("/run-json/", json={"code": "print(1)", "labels": labels})
        assert assert_problem(response, 422, words)["type"] == PROBLEMS + "label"
    response = await client.post("/run-file/", files={"file": ("main.py", b"1")}, data={"label": "team"})
    assert assert_problem(response, 422, "name=value")["type"] == PROBLEMS + "label"
    assert (await client.get("/runs")).json()["runs"] == []


async def test_runs_pages_by_cursor_and_filters(client: AsyncTestClient[Litestar]) -> None:
    """Five runs paged two at a time come newest first, each once; status, environment and
    time filters pick among them."""
    ids = []
    for i in range(5):
        response = await client.post("/run-json/", json={"code": "1", "labels": {"i": str(i)}})
        ids.append(response.json()["id"])
    seen, cursor = [], None
    while True:
        params = {"limit": "2"} | ({} if cursor is None else {"cursor": cursor})
        page = (await client.get("/runs", params=params)).json()
        seen += [run["id"] for run in page["runs"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert len((await client.get("/runs", params={"status": "succeeded"})).json()["runs"]) == 5
    assert (await client.get("/runs", params={"status": "failed,error"})).json()["runs"] == []
    assert (await client.get("/runs", params={"environment": "sci"})).json()["runs"] == []
    assert (await client.get("/runs", params={"since": "2999-01-01T00:00:00Z"})).json()["runs"] == []
    assert len((await client.get("/runs", params={"until": "4102444800"})).json()["runs"]) == 5


async def test_bad_listing_parameters_are_a_422(client: AsyncTestClient[Litestar]) -> None:
    """A cursor the server never gave, a limit past 500 or under 1, an unknown status, a time
    without an offset, an unknown parameter: each a `query` problem naming it; a bad label a
    `label` one."""
    for params, word in (
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": encode_cursor(Position(1.0, 1))[:-2] + "!!"}, "cursor"),
        ({"limit": "501"}, "1-500"),
        ({"limit": "0"}, "1-500"),
        ({"limit": "ten"}, "whole number"),
        ({"status": "done"}, "unknown status"),
        ({"since": "2026-01-01T00:00:00"}, "offset"),
        ({"until": "yesterday"}, "until"),
        ({"sort": "asc"}, "sort"),
    ):
        assert (
            assert_problem(await client.get("/runs", params=params), 422, word)["type"] == PROBLEMS + "query"
        )
    response = await client.get("/runs", params={"label": "Team=x"})
    assert assert_problem(response, 422, "a-z")["type"] == PROBLEMS + "label"
