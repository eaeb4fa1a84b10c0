"""Batches on the real app: POST /runs/batch checks every run, queues all of them or none (the
queue's edge, a key's environments, a bad run named by its place), and each run then lives on its own."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import IMAGE, MAX_BODY, POOL_SIZE, PROBLEMS, assert_problem, bearer, has_status
from support.fakes import FakeLeaser, RecordingRunner
from support.waiting import until

from warmpod import keys
from warmpod.client import AsyncClient, Client, ProblemError
from warmpod.client.wire import batch_body, request_body
from warmpod.environments import Environments, EnvironmentSpec
from warmpod.models import EnvironmentInfo, RunResult
from warmpod.service import Service
from warmpod.settings import Settings, from_env

EDGE = 25
"""The queue's bound here: room for a batch of 20 and a few runs beside it."""
MAX_BATCH = 20
BATCH = "/runs/batch"


def runs(*codes: str, **fields: Any) -> dict[str, Any]:
    """A batch body of one run per code, each with ``fields``."""
    return {"runs": [{"code": code, **fields} for code in codes]}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """Where the keyed tests' keys file is."""
    return tmp_path / "keys"


@pytest.fixture
def tokens(key_file: Path) -> dict[str, str]:
    """The keys, as `warmpod keys add` printed them: alice may use the finance environment alone."""
    return {
        "alice": keys.add(key_file, "alice", environments=frozenset({"finance"})),
        "bob": keys.add(key_file, "bob"),
    }


@pytest.fixture
def settings(request: pytest.FixtureRequest, key_file: Path, tokens: dict[str, str]) -> Settings:
    """The API suite's settings with room for a batch; with the keys file on where a test asks
    (``indirect`` True)."""
    server: dict[str, Any] = {"max_body_bytes": MAX_BODY}
    if getattr(request, "param", False):
        server["api_keys_file"] = str(key_file)
    return from_env({}, server=server, pool={"size": POOL_SIZE}, queue={"max_queued": EDGE})


@pytest.fixture(autouse=True)
def declared(service: Service, settings: Settings, leaser: FakeLeaser) -> None:
    """The service declares a second environment, finance, and serves both."""
    names = ["default", "finance"]
    leaser.environments = names
    service.runner.environments = Environments(
        [
            EnvironmentSpec(name=name, requirements=None, preload=(), min_warm=1, limits=settings.limits)
            for name in names
        ]
    )
    service.catalogue = [
        EnvironmentInfo(
            name=name, python="3.13.5", packages={}, preload=[], min_warm=1, image=f"{IMAGE}-{name}"
        )
        for name in names
    ]


async def queued(client: AsyncTestClient[Litestar]) -> int:
    """How many runs wait, as /health counts them."""
    count: int = (await client.get("/health")).json()["queue"]["queued"]
    return count


async def test_a_batch_answers_its_runs_in_order_and_each_ends_on_its_own(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """202 with one Accepted per run, in the order sent (each run's labels say which it is); every
    run's status URL reports its own result."""
    body = {"runs": [{"code": f"print({i})", "labels": {"place": str(i)}} for i in range(3)]}
    response = await client.post(BATCH, json=body)
    assert response.status_code == 202, response.text
    accepted = response.json()["runs"]
    assert [set(run) for run in accepted] == [{"id", "status", "status_url", "stream_url"}] * 3
    assert len({run["id"] for run in accepted}) == 3
    for i, run in enumerate(accepted):
        assert run["status"] == "queued"
        assert run["status_url"] == f"http://testserver.local/status/{run['id']}"
        assert run["stream_url"] == f"{run['status_url']}/stream"
        await until(functools.partial(has_status, client, run["status_url"], "succeeded"))
        result = (await client.get(run["status_url"])).json()
        assert result["labels"] == {"place": str(i)}
    assert sorted(code for code, _, _ in runner.calls) == [b"print(0)", b"print(1)", b"print(2)"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        pytest.param(
            {"runs": [{"code": "1"}, {"code": "2"}, {"code": "3", "timeout": 3600}]},
            422,
            ["runs[2]", "timeout", "at most 60"],
            id="limit",
        ),
        pytest.param(
            {"runs": [{"code": "1"}, {"code": "2", "labels": {"Bad": "x"}}]},
            422,
            ["runs[1]", "label"],
            id="label",
        ),
        pytest.param(
            {"runs": [{"code": "1", "files": [{"path": "../x", "content": ""}]}, {"code": "2"}]},
            422,
            ["runs[0]", "file path"],
            id="file",
        ),
        pytest.param(
            {"runs": [{"code": "1"}, {"code": "2", "environment": "nope"}]},
            422,
            ["runs[1]", "'nope'"],
            id="environment",
        ),
        pytest.param(
            {"runs": [{"code": "1"}, {"code": "2", "wait": True}]}, 422, ["runs[1]", "wait"], id="wait"
        ),
        pytest.param(
            {"runs": [{"code": "1"}, {"code": "2", "timeout": True}]}, 400, ["$.runs[1].timeout"], id="schema"
        ),
        pytest.param(
            {"runs": [{"code": "1"}, {"code": "2"}, {"stdin": "x"}]}, 400, ["code", "$.runs[2]"], id="no-code"
        ),
        pytest.param({"runs": [{"code": "1", "extra": 1}]}, 400, ["extra", "$.runs[0]"], id="unknown-field"),
        pytest.param({"runs": [], "more": 1}, 400, ["more"], id="unknown-top-field"),
    ],
)
async def test_one_bad_run_refuses_the_whole_batch_naming_its_place(
    client: AsyncTestClient[Litestar],
    runner: RecordingRunner,
    body: dict[str, Any],
    status: int,
    words: list[str],
) -> None:
    """A run that breaks a rule (422) or the schema (400) refuses every run of the batch, and the
    problem names its place; nothing is stored, nothing runs."""
    response = await client.post(BATCH, json=body)
    problem = assert_problem(response, status, *words)
    if status == 422 and "wait" in words:
        assert problem["type"] == PROBLEMS + "batch"
    assert (await client.get("/runs")).json()["runs"] == []
    assert runner.calls == []


@pytest.mark.parametrize("count", [0, MAX_BATCH + 1])
async def test_a_batch_of_none_or_past_max_batch_is_a_422_naming_the_setting(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, count: int
) -> None:
    """An empty batch, or one over WARMPOD_QUEUE__MAX_BATCH, is refused whole, naming the setting."""
    response = await client.post(BATCH, json=runs(*["1"] * count))
    problem = assert_problem(response, 422, "WARMPOD_QUEUE__MAX_BATCH", f"not {count}")
    assert problem["type"] == PROBLEMS + "batch"
    assert (await client.get("/runs")).json()["runs"] == []


async def test_a_bad_body_or_a_query_is_a_400_problem(client: AsyncTestClient[Litestar]) -> None:
    """Broken JSON, no body, or a query parameter (a batch takes none, not even ``wait``): 400."""
    for content, words in ((b"{", ["runs"]), (b"", ["empty"])):
        response = await client.post(BATCH, content=content, headers={"content-type": "application/json"})
        assert_problem(response, 400, *words)
    assert_problem(await client.post(f"{BATCH}?wait=true", json=runs("1")), 400, "wait")


@pytest.mark.parametrize("settings", [True], indirect=True)
async def test_a_run_of_an_environment_the_key_may_not_use_refuses_the_batch(
    anonymous: AsyncTestClient[Litestar], runner: RecordingRunner, tokens: dict[str, str]
) -> None:
    """With a keys file, one run naming an environment its key is not granted is a 403 naming its
    place, and none of the batch is stored; the same runs of that environment alone go through."""
    alice = bearer(tokens["alice"])
    body = {"runs": [{"code": "1", "environment": "finance"}, {"code": "2", "environment": "default"}]}
    response = await anonymous.post(BATCH, json=body, headers=alice)
    problem = assert_problem(response, 403, "runs[1]", "may not use the environment 'default'")
    assert problem["type"] == PROBLEMS + "environment-denied"
    assert (await anonymous.get("/runs", headers=alice)).json()["runs"] == []
    allowed = await anonymous.post(BATCH, json={"runs": body["runs"][:1] * 2}, headers=alice)
    assert allowed.status_code == 202, allowed.text
    assert len((await anonymous.get("/runs", headers=alice)).json()["runs"]) == 2


async def test_a_batch_at_the_queues_edge_is_taken_whole_or_refused_whole(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """With every worker busy and room for 19, a batch of 20 is a 429 with Retry-After and the
    queue holds what it held; a batch of 19 is taken whole."""
    runner.hold = anyio.Event()
    for _ in range(POOL_SIZE + EDGE - 19):
        assert (await client.post("/run-json/", json={"code": "pass", "wait": False})).status_code == 202
    await until(lambda: len(runner.calls) >= POOL_SIZE)
    assert await queued(client) == EDGE - 19
    refused = await client.post(BATCH, json=runs(*["1"] * 20))
    problem = assert_problem(refused, 429, "no room for 20", str(EDGE))
    assert problem["type"] == PROBLEMS + "queue-full"
    assert refused.headers["retry-after"] == "1"
    assert await queued(client) == EDGE - 19
    assert len((await client.get("/runs?limit=100")).json()["runs"]) == POOL_SIZE + EDGE - 19
    taken = await client.post(BATCH, json=runs(*["1"] * 19))
    assert taken.status_code == 202, taken.text
    assert len(taken.json()["runs"]) == 19
    assert await queued(client) == EDGE
    runner.hold.set()


async def test_cancelling_one_run_of_a_batch_leaves_the_others(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A batch's runs are runs of their own: one cancelled while queued ends cancelled and never
    starts; the others run and succeed."""
    runner.hold = anyio.Event()
    for _ in range(POOL_SIZE):
        assert (await client.post("/run-json/", json={"code": "pass", "wait": False})).status_code == 202
    await until(lambda: len(runner.calls) >= POOL_SIZE)
    ids = [run["id"] for run in (await client.post(BATCH, json=runs("1", "2", "3"))).json()["runs"]]
    cancelled = await client.delete(f"/status/{ids[1]}")
    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
    runner.hold.set()
    for run_id in (ids[0], ids[2]):
        await until(functools.partial(has_status, client, f"/status/{run_id}", "succeeded"))
    assert (await client.get(f"/status/{ids[1]}")).json()["status"] == "cancelled"
    assert sorted(code for code, _, _ in runner.calls) == [b"1", b"3", *[b"pass"] * POOL_SIZE]


async def test_a_retried_batch_is_answered_with_the_same_runs(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """The same Idempotency-Key and body again answer the same ids in order, never running them
    twice; another body under the key is a 422 reuse; a malformed key is a 400."""
    key = {"Idempotency-Key": '"batch-2026-12-07"'}
    first = await client.post(BATCH, json=runs("1", "2"), headers=key)
    again = await client.post(BATCH, json=runs("1", "2"), headers=key)
    assert (first.status_code, again.status_code) == (202, 202), again.text
    ids = [run["id"] for run in first.json()["runs"]]
    assert [run["id"] for run in again.json()["runs"]] == ids
    other = await client.post(BATCH, json=runs("2", "1"), headers=key)
    problem = assert_problem(other, 422, "Idempotency-Key", ids[0])
    assert problem["type"] == PROBLEMS + "idempotency-key-reused"
    assert_problem(await client.post(BATCH, json=runs("1"), headers={"Idempotency-Key": "has space"}), 400)
    for run_id in ids:
        await until(functools.partial(has_status, client, f"/status/{run_id}", "succeeded"))
    assert sorted(code for code, _, _ in runner.calls) == [b"1", b"2"]


async def test_the_schema_documents_the_batch(client: AsyncTestClient[Litestar]) -> None:
    """/schema/openapi.json has POST /runs/batch: a BatchRequest of RunRequests, 202 BatchAccepted,
    its problems, and the Idempotency-Key header."""
    schema = (await client.get("/schema/openapi.json")).json()
    operation = schema["paths"][BATCH]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/BatchRequest")
    assert operation["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/BatchAccepted"
    )
    assert set(operation["responses"]) == {"202", "400", "401", "403", "413", "422", "429", "503"}
    components = schema["components"]["schemas"]
    batch = components["BatchRequest"]
    assert batch["properties"]["runs"]["items"]["$ref"] == "#/components/schemas/RunRequest"
    assert (batch["properties"]["runs"]["minItems"], batch["additionalProperties"]) == (1, False)
    assert components["BatchAccepted"]["properties"]["runs"]["items"]["$ref"].endswith("/Accepted")
    (header,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert (header["in"], header["required"]) == ("header", False)


def test_the_client_submits_a_batch_and_follows_each_run(live: str, runner: RecordingRunner) -> None:
    """Client.submit_batch answers the runs in order, each its own to follow; a refused batch is a
    ProblemError naming the run's place."""
    with Client(live) as warmpod:
        accepted = warmpod.submit_batch(
            ["print(1)", {"code": "print(2)", "stdin": "x", "labels": {"n": "2"}}]
        )
        assert [run.status for run in accepted] == ["queued", "queued"]
        for run in accepted:
            *_, result = warmpod.stream(run.id)
            assert isinstance(result, RunResult)
            assert (result.id, result.status) == (run.id, "succeeded")
        assert warmpod.status(accepted[1].id).labels == {"n": "2"}
        with pytest.raises(ProblemError) as refused:
            warmpod.submit_batch(["1", {"code": "2", "timeout": 3600}])
        assert (refused.value.status, "runs[1]" in refused.value.detail) == (422, True)
    assert sorted(runner.calls) == [(b"print(1)", b"", 10.0), (b"print(2)", b"x", 10.0)]


async def test_the_async_client_submits_a_batch(live: str, runner: RecordingRunner) -> None:
    """AsyncClient.submit_batch is the same: runs from a project's files too, in order."""
    async with AsyncClient(live) as warmpod:
        accepted = await warmpod.submit_batch(
            [{"files": [("main.py", b"print(3)")]}, {"code": "print(4)", "environment": "finance"}]
        )
        assert len(accepted) == 2
        for run in accepted:
            await until(functools.partial(_ended, warmpod, run.id))
        assert (await warmpod.status(accepted[1].id)).environment == "finance"
    assert sorted(code for code, _, _ in runner.calls) == [b"", b"print(4)"]


async def _ended(warmpod: AsyncClient, run_id: str) -> bool:
    return (await warmpod.status(run_id)).status == "succeeded"


def test_the_batch_body_is_what_the_server_takes() -> None:
    """The client's batch body is a BatchRequest of the runs as submit would send each."""
    body = json.loads(
        batch_body(["print(1)", {"code": None, "files": [("a.py", b"")], "entrypoint": "a.py"}])
    )
    assert body["runs"][0] == json.loads(request_body("print(1)"))
    assert body["runs"][1] == json.loads(request_body(None, files=[("a.py", b"")], entrypoint="a.py"))
    with pytest.raises(TypeError, match="BatchRun"):
        batch_body([b"print(1)"])  # type: ignore[list-item]
