"""Environments on the real app: a run names one (JSON or form), checked against the server's and its
key's before it is queued; GET /environments lists those the key may use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import IMAGE, MAX_BODY, MAX_QUEUED, POOL_SIZE, PROBLEMS, assert_problem, bearer
from support.fakes import FakeLeaser, RecordingRunner

from warmpod import keys
from warmpod.cli import main
from warmpod.client import AsyncClient, Client, ProblemError
from warmpod.environments import Environments, EnvironmentSpec
from warmpod.models import EnvironmentInfo
from warmpod.service import Service
from warmpod.settings import Settings, from_env

NAMES = ("default", "finance", "ml-gpu")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """Where the keyed tests' keys file is."""
    return tmp_path / "keys"


@pytest.fixture
def tokens(key_file: Path) -> dict[str, str]:
    """The keys, as `warmpod keys add` printed them: alice may use finance alone, bob every environment."""
    return {
        "alice": keys.add(key_file, "alice", environments=frozenset({"finance"})),
        "bob": keys.add(key_file, "bob"),
    }


@pytest.fixture
def settings(request: pytest.FixtureRequest, key_file: Path, tokens: dict[str, str]) -> Settings:
    """The API suite's settings; with the keys file on where a test asks (``indirect`` True)."""
    server: dict[str, Any] = {"max_body_bytes": MAX_BODY}
    if getattr(request, "param", False):
        server["api_keys_file"] = str(key_file)
    return from_env({}, server=server, pool={"size": POOL_SIZE}, queue={"max_queued": MAX_QUEUED})


@pytest.fixture(autouse=True)
def declared(service: Service, settings: Settings, leaser: FakeLeaser) -> None:
    """The service declares three environments, has read each one's image and serves them all."""
    leaser.environments = list(NAMES)
    service.runner.environments = Environments(
        [
            EnvironmentSpec(name=name, requirements=None, preload=(), min_warm=1, limits=settings.limits)
            for name in NAMES
        ]
    )
    service.catalogue = [
        EnvironmentInfo(
            name=name,
            python="3.13.5",
            packages={"numpy": "2.3.0"},
            preload=["numpy"],
            min_warm=1,
            image=f"{IMAGE}-{name}",
        )
        for name in NAMES
    ]


@pytest.fixture
async def anonymous(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """A client of the started app that sends no key of its own."""
    async with AsyncTestClient(app) as client:
        yield client


async def test_the_named_environment_goes_into_the_spec(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A run's ``environment`` reaches the runner's spec; a run that names none runs in ``default``."""
    named = await client.post("/run-json/", json={"code": "1", "environment": "ml-gpu"})
    assert named.status_code == 200, named.text
    plain = await client.post("/run-json/", json={"code": "1"})
    assert plain.status_code == 200, plain.text
    assert [spec.environment for spec in runner.specs] == ["ml-gpu", "default"]


async def test_an_unknown_environment_is_a_422_listing_the_known_ones(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """An environment the server does not declare is refused before it is queued, with a problem of
    its own type whose detail lists every environment the server has."""
    response = await client.post("/run-json/", json={"code": "1", "environment": "finanse"})
    problem = assert_problem(response, 422, "'finanse'", "default, finance, ml-gpu")
    assert problem["type"] == PROBLEMS + "environment"
    assert problem["title"] == "Unknown environment"
    assert runner.specs == []


async def test_the_form_takes_an_environment(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """/run-file/'s ``environment`` field names the environment as JSON's does; empty, ``default``."""
    script = {"file": ("main.py", b"print(1)")}
    named = await client.post("/run-file/", files=script, data={"environment": "finance"})
    assert named.status_code == 200, named.text
    empty = await client.post("/run-file/", files=script, data={"environment": ""})
    assert empty.status_code == 200, empty.text
    unknown = await client.post("/run-file/", files=script, data={"environment": "nope"})
    assert_problem(unknown, 422, "'nope'", "default, finance, ml-gpu")
    assert [spec.environment for spec in runner.specs] == ["finance", "default"]


@pytest.mark.parametrize("settings", [True], indirect=True)
async def test_a_key_uses_only_the_environments_granted_to_it(
    anonymous: AsyncTestClient[Litestar], runner: RecordingRunner, tokens: dict[str, str]
) -> None:
    """With a keys file a key limited by ``environments=`` may name only those (another is a 403 of
    its own type, ``default`` included); a key without the option may name every one; an unknown
    name is a 422 whatever the key."""
    alice, bob = bearer(tokens["alice"]), bearer(tokens["bob"])
    for headers, name in ((alice, "finance"), (bob, "ml-gpu"), (bob, "default")):
        allowed = await anonymous.post("/run-json/", json={"code": "1", "environment": name}, headers=headers)
        assert allowed.status_code == 200, allowed.text
    for name in ("default", "ml-gpu"):
        response = await anonymous.post("/run-json/", json={"code": "1", "environment": name}, headers=alice)
        problem = assert_problem(response, 403, f"may not use the environment '{name}'")
        assert problem["type"] == PROBLEMS + "environment-denied"
    unknown = await anonymous.post("/run-json/", json={"code": "1", "environment": "nope"}, headers=alice)
    assert_problem(unknown, 422, "'nope'")
    assert [spec.environment for spec in runner.specs] == ["finance", "ml-gpu", "default"]


async def test_environments_lists_the_catalogue(client: AsyncTestClient[Litestar]) -> None:
    """GET /environments answers every environment of the catalogue, ``default`` first, as
    EnvironmentInfo; GET /environment is still the image's own record."""
    response = await client.get("/environments")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [info["name"] for info in body] == list(NAMES)
    assert body[1] == {
        "name": "finance",
        "python": "3.13.5",
        "packages": {"numpy": "2.3.0"},
        "preload": ["numpy"],
        "min_warm": 1,
        "image": f"{IMAGE}-finance",
    }
    assert (await client.get("/environment")).status_code == 404  # the fake service recorded none


@pytest.mark.parametrize("settings", [True], indirect=True)
async def test_environments_lists_only_what_the_key_may_use(
    anonymous: AsyncTestClient[Litestar], tokens: dict[str, str]
) -> None:
    """A key limited to some environments sees only those in GET /environments; a key without the
    option sees every one; no key is a 401."""
    alice = await anonymous.get("/environments", headers=bearer(tokens["alice"]))
    assert [info["name"] for info in alice.json()] == ["finance"]
    bob = await anonymous.get("/environments", headers=bearer(tokens["bob"]))
    assert [info["name"] for info in bob.json()] == list(NAMES)
    assert_problem(await anonymous.get("/environments"), 401)


async def test_environments_are_in_the_schema(client: AsyncTestClient[Litestar]) -> None:
    """The schema documents GET /environments with its body and problems, the run's JSON and form
    ``environment`` fields, and a submit's 403 and 422 mention environments."""
    schema = (await client.get("/schema/openapi.json")).json()
    listing = schema["paths"]["/environments"]["get"]
    assert set(listing["responses"]) == {"200", "401", "429", "503"}
    assert listing["security"] == [{"apiKey": []}]
    assert "environment" in schema["components"]["schemas"]["RunRequest"]["properties"]
    run_json = schema["paths"]["/run-json"]["post"]
    run_file = schema["paths"]["/run-file"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "environment" in run_file["schema"]["properties"]
    for status in ("403", "422"):
        assert "environment" in run_json["responses"][status]["description"]


def test_the_client_names_the_environment_and_lists_them(live: str, runner: RecordingRunner) -> None:
    """``environment=`` goes with the client's run; ``environments()`` answers EnvironmentInfo; an
    unknown name raises the 422 problem."""
    with Client(live) as warmpod:
        assert warmpod.run("1", environment="finance").status == "succeeded"
        assert warmpod.run("1").status == "succeeded"
        listed = warmpod.environments()
        with pytest.raises(ProblemError) as caught:
            warmpod.submit("1", environment="nope")
    assert [spec.environment for spec in runner.specs] == ["finance", "default"]
    assert all(isinstance(info, EnvironmentInfo) for info in listed)
    assert [info.name for info in listed] == list(NAMES)
    assert (caught.value.status, caught.value.type) == (422, PROBLEMS + "environment")


async def test_the_async_client_names_the_environment_and_lists_them(
    live: str, runner: RecordingRunner
) -> None:
    """AsyncClient's ``environment=`` and ``environments()`` are the blocking client's."""
    async with AsyncClient(live) as warmpod:
        assert (await warmpod.run("1", environment="ml-gpu")).status == "succeeded"
        listed = await warmpod.environments()
    assert [spec.environment for spec in runner.specs] == ["ml-gpu"]
    assert [info.name for info in listed] == list(NAMES)


def test_warmpod_run_takes_environment_beside_env(live: str, runner: RecordingRunner, tmp_path: Path) -> None:
    """``--environment`` (or ``--env-name``) names the environment and ``--env`` still sets a variable,
    whichever comes first."""
    script = tmp_path / "main.py"
    script.write_text("print(1)\n")
    for chosen in (["--env", "K=V", "--environment", "finance"], ["--env-name", "ml-gpu", "--env=K=V"]):
        assert main(["run", "--server", live, str(script), *chosen]) == 0
    assert main(["run", "--server", live, str(script), "--env", "K=V"]) == 0
    assert [(spec.environment, spec.env) for spec in runner.specs] == [
        ("finance", (("K", "V"),)),
        ("ml-gpu", (("K", "V"),)),
        ("default", (("K", "V"),)),
    ]


def test_warmpod_environments_prints_a_table_or_json(live: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``warmpod environments`` prints a table of name, Python, package count, preload and min_warm;
    ``--json`` prints what GET /environments answered."""
    assert main(["environments", "--server", live]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PYTHON", "PACKAGES", "PRELOAD", "MIN_WARM"]
    assert [line.split() for line in lines[1:]] == [[name, "3.13.5", "1", "numpy", "1"] for name in NAMES]
    assert main(["environments", "--server", live, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [info["name"] for info in listed] == list(NAMES)
    assert listed[0]["packages"] == {"numpy": "2.3.0"}
