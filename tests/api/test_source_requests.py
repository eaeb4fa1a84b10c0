"""Data sources on the real app: a run asks for declared ones by name; an unknown or ungranted one is
a 403 naming it, a malformed name a 422, through JSON and the form alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import MAX_BODY, MAX_QUEUED, POOL_SIZE, PROBLEMS, assert_problem
from support.fakes import RecordingRunner

from warmpod import keys
from warmpod.service import Service
from warmpod.settings import Settings, from_env
from warmpod.sources import Sources

SOURCES = '[warehouse]\nhost = "127.0.0.1"\nport = 5432\n\n[crm]\nhost = "crm.internal"\nport = 443\n'


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """The keys file of the keyed tests: alice may reach the warehouse, bob nothing."""
    path = tmp_path / "keys"
    return path


@pytest.fixture
def tokens(key_file: Path) -> dict[str, str]:
    """The keys, as `warmpod keys add` printed them."""
    return {
        "alice": keys.add(key_file, "alice", sources=frozenset({"warehouse"})),
        "bob": keys.add(key_file, "bob"),
    }


@pytest.fixture
def settings(request: pytest.FixtureRequest, key_file: Path, tokens: dict[str, str]) -> Settings:
    """The API suite's settings; with the keys file on where a test asks (``indirect`` True)."""
    server: dict[str, Any] = {"max_body_bytes": MAX_BODY}
    if getattr(request, "param", False):
        server["api_keys_file"] = str(key_file)
    return from_env({}, server=server, pool={"size": POOL_SIZE}, queue={"max_queued": MAX_QUEUED})


@pytest.fixture
def sources_file(service: Service, tmp_path: Path) -> Path:
    """The operator's sources file, declaring ``warehouse`` and ``crm``, in force in the service."""
    path = tmp_path / "sources.toml"
    path.write_text(SOURCES)
    service.sources = Sources(path)
    return path


@pytest.fixture
async def anonymous(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """A client of the started app that sends no key of its own."""
    async with AsyncTestClient(app) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_declared_source_is_asked_for_by_name(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, sources_file: Path
) -> None:
    """Without a keys file every declared source may be asked for; the run carries the names."""
    response = await client.post("/run-json/", json={"code": "1", "sources": ["warehouse", "crm"]})
    assert response.status_code == 200, response.text
    assert runner.sources == [("warehouse", "crm")]


async def test_an_undeclared_source_is_a_403_naming_it(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, sources_file: Path
) -> None:
    """A source the file does not declare is refused with a ``source-denied`` problem, unrun."""
    response = await client.post("/run-json/", json={"code": "1", "sources": ["warehouse", "ledger"]})
    problem = assert_problem(response, 403, "'ledger'", "sources file")
    assert problem["type"] == PROBLEMS + "source-denied"
    assert runner.calls == []


async def test_no_sources_file_refuses_every_source(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A server with no sources file declares none: any source asked for is a 403."""
    response = await client.post("/run-json/", json={"code": "1", "sources": ["warehouse"]})
    assert_problem(response, 403, "'warehouse'")
    assert runner.calls == []


@pytest.mark.parametrize(
    ("sources", "words"),
    [
        (["Warehouse"], ["'Warehouse'", "source name"]),
        (["data-lake"], ["'data-lake'"]),
        (["a" * 33], ["source name"]),
        (["warehouse", "warehouse"], ["twice"]),
        ([f"s{i}" for i in range(17)], ["at most 16"]),
    ],
)
async def test_a_malformed_source_list_is_a_422(
    client: AsyncTestClient[Litestar],
    runner: RecordingRunner,
    sources_file: Path,
    sources: list[str],
    words: list[str],
) -> None:
    """A name that is not a source's, one given twice or too many are refused before any lookup."""
    response = await client.post("/run-json/", json={"code": "1", "sources": sources})
    problem = assert_problem(response, 422, *words)
    assert problem["type"] == PROBLEMS + "program"
    assert runner.calls == []


async def test_sources_not_a_list_of_names_is_a_400(client: AsyncTestClient[Litestar]) -> None:
    """``sources`` must be a JSON list of strings."""
    response = await client.post("/run-json/", json={"code": "1", "sources": "warehouse"})
    assert_problem(response, 400, "sources")


async def test_the_form_takes_sources_one_part_each_or_comma_separated(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, sources_file: Path
) -> None:
    """/run-file/'s ``sources`` parts are names, one or several a part; they are checked as JSON's."""
    script = {"file": ("main.py", b"print(1)")}
    response = await client.post("/run-file/", files=script, data={"sources": ["warehouse, crm"]})
    assert response.status_code == 200, response.text
    response = await client.post("/run-file/", files=script, data={"sources": ["crm", "warehouse"]})
    assert response.status_code == 200, response.text
    assert runner.sources == [("warehouse", "crm"), ("crm", "warehouse")]
    denied = await client.post("/run-file/", files=script, data={"sources": "ledger"})
    assert assert_problem(denied, 403, "'ledger'")["type"] == PROBLEMS + "source-denied"
    malformed = await client.post("/run-file/", files=script, data={"sources": "Ledger"})
    assert_problem(malformed, 422, "'Ledger'")
    assert len(runner.calls) == 2


@pytest.mark.parametrize("settings", [True], indirect=True)
async def test_a_key_reaches_only_the_sources_granted_to_it(
    anonymous: AsyncTestClient[Litestar],
    runner: RecordingRunner,
    sources_file: Path,
    tokens: dict[str, str],
) -> None:
    """With a keys file a key may ask only for the sources its ``sources=`` grants: another declared
    one is a 403 naming it, as an undeclared one is."""
    alice, bob = bearer(tokens["alice"]), bearer(tokens["bob"])
    allowed = await anonymous.post("/run-json/", json={"code": "1", "sources": ["warehouse"]}, headers=alice)
    assert allowed.status_code == 200, allowed.text
    for headers, name in ((alice, "crm"), (bob, "warehouse")):
        response = await anonymous.post("/run-json/", json={"code": "1", "sources": [name]}, headers=headers)
        problem = assert_problem(response, 403, f"may not use the data source '{name}'")
        assert problem["type"] == PROBLEMS + "source-denied"
    assert runner.sources == [("warehouse",)]


async def test_metrics_name_the_source_series(client: AsyncTestClient[Litestar]) -> None:
    """/metrics exposes the relay's counters (per source, and bytes per direction) from the start."""
    text = (await client.get("/metrics")).text
    for series in (
        "warmpod_source_connections_total",
        "warmpod_source_refused_total",
        "warmpod_source_bytes_total",
    ):
        assert f"# TYPE {series} counter" in text
