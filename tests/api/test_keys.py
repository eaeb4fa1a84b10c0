"""API keys on the real app: 401s, open paths, per-key quotas and ownership, rotation, and no key in a log."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import MAX_BODY, MAX_QUEUED, POOL_SIZE, PROBLEMS, assert_problem, bearer, has_status
from support.fakes import RecordingRunner
from support.waiting import until

from warmpod import keys
from warmpod.cli import main
from warmpod.client import Client, ProblemError
from warmpod.errors import SettingsError
from warmpod.http.app import create_app
from warmpod.settings import Settings, from_env


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A keys file the operator made with `warmpod keys add`: alice may have one run at a time."""
    return tmp_path / "keys"


@pytest.fixture
def secrets(key_file: Path) -> dict[str, str]:
    """The keys themselves, as `warmpod keys add` printed them."""
    return {"alice": keys.add(key_file, "alice", max_active=1), "bob": keys.add(key_file, "bob")}


@pytest.fixture
def settings(key_file: Path, secrets: dict[str, str]) -> Settings:
    """The API suite's settings with the keys file on."""
    return from_env(
        {},
        server={"max_body_bytes": MAX_BODY, "api_keys_file": str(key_file)},
        pool={"size": POOL_SIZE},
        queue={"max_queued": MAX_QUEUED},
    )


async def test_no_key_or_a_wrong_one_is_401_and_the_right_one_runs(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]
) -> None:
    for headers in ({}, bearer("not-a-key"), {"Authorization": "Basic abc"}, bearer(secrets["alice"] + "x")):
        response = await anonymous.post("/run-json/", json={"code": "print(1)"}, headers=headers)
        assert_problem(response, 401, "key")
        assert response.headers["www-authenticate"].startswith("Bearer")
    response = await anonymous.post("/run-json/", json={"code": "print(1)"}, headers=bearer(secrets["bob"]))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"


async def test_only_health_and_the_playground_are_open(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]
) -> None:
    for path in ("/health", "/", "/static/playground.js", "/static/swagger-ui/swagger-ui.css"):
        assert (await anonymous.get(path)).status_code == 200, path
    for path in (
        "/environment",
        "/metrics",
        "/schema/openapi.json",
        "/schema/swagger",
        f"/status/{'0' * 32}",
    ):
        assert_problem(await anonymous.get(path), 401)
        assert (await anonymous.get(path, headers=bearer(secrets["bob"]))).status_code != 401, path


async def test_a_keys_quota_holds_it_back_and_not_the_others(
    anonymous: AsyncTestClient[Litestar], runner: RecordingRunner, secrets: dict[str, str]
) -> None:
    runner.hold = anyio.Event()
    alice, bob = bearer(secrets["alice"]), bearer(secrets["bob"])
    first = await anonymous.post("/run-json/", json={"code": "1", "wait": False}, headers=alice)
    assert first.status_code == 202
    refused = await anonymous.post("/run-json/", json={"code": "2", "wait": False}, headers=alice)
    problem = assert_problem(refused, 429, "alice", "max_active")
    assert problem["type"] == PROBLEMS + "key-busy"
    assert refused.headers["retry-after"] == "1"
    for _ in range(2):
        assert (
            await anonymous.post("/run-json/", json={"code": "3", "wait": False}, headers=bob)
        ).status_code == 202
    runner.hold.set()
    await until(
        lambda: has_status(anonymous, first.headers["location"], "succeeded", alice), 10, interval=0.02
    )
    again = await anonymous.post("/run-json/", json={"code": "4", "wait": False}, headers=alice)
    assert again.status_code == 202


async def test_another_keys_run_is_not_found(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]
) -> None:
    alice, bob = bearer(secrets["alice"]), bearer(secrets["bob"])
    run = (await anonymous.post("/run-json/", json={"code": "1"}, headers=alice)).json()
    url = f"/status/{run['id']}"
    assert (await anonymous.get(url, headers=alice)).json()["status"] == "succeeded"
    unknown = assert_problem(await anonymous.get(f"/status/{'0' * 32}", headers=bob), 404)
    for method, path in (("GET", ""), ("GET", "/stream"), ("GET", "/files/out/x.txt"), ("DELETE", "")):
        response = await anonymous.request(method, url + path, headers=bob)
        problem = assert_problem(response, 404)
        # Word for word what an unknown id gets, but for the id: no key learns which ids exist.
        assert problem["detail"].replace(run["id"], "0" * 32) == unknown["detail"]


async def test_keys_rotate_without_a_restart(
    anonymous: AsyncTestClient[Litestar], key_file: Path, secrets: dict[str, str]
) -> None:
    bob = bearer(secrets["bob"])
    assert (await anonymous.get("/environment", headers=bob)).status_code != 401
    keys.remove(key_file, "bob")
    assert_problem(await anonymous.get("/environment", headers=bob), 401)
    carol = bearer(keys.add(key_file, "carol"))
    assert (await anonymous.get("/environment", headers=carol)).status_code != 401
    # A half-written file keeps the keys read before in force.
    key_file.write_text(key_file.read_text() + "broken line\n")
    assert (await anonymous.get("/environment", headers=carol)).status_code != 401


async def test_a_key_never_reaches_a_log_or_an_answer(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = secrets["alice"]
    answers = [
        await anonymous.post("/run-json/", json={"code": "1"}, headers=bearer(key)),
        await anonymous.post("/run-json/", json={"code": "1"}, headers=bearer(key + "-wrong")),
        await anonymous.get(f"/status/{'0' * 32}", headers=bearer(key)),
    ]
    assert key not in caplog.text
    for answer in answers:
        assert key not in answer.text
        assert key not in str(answer.headers)


async def test_the_schema_declares_the_bearer_scheme(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]
) -> None:
    schema = (await anonymous.get("/schema/openapi.json", headers=bearer(secrets["bob"]))).json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["apiKey"]["description"],
    }
    assert "security" not in schema  # /health needs no key: each operation says whether it does
    for path, method in (
        ("/run-json", "post"),
        ("/run-file", "post"),
        ("/status/{run_id}", "get"),
        ("/environment", "get"),
    ):
        assert schema["paths"][path][method]["security"] == [{"apiKey": []}], path
    assert "security" not in schema["paths"]["/health"]["get"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "", "warmpod.example"])
def test_serving_beyond_loopback_without_keys_is_refused(host: str) -> None:
    with pytest.raises(SettingsError, match="WARMPOD_SERVER__API_KEYS_FILE") as caught:
        create_app(from_env({}, server={"host": host}))
    assert "WARMPOD_SERVER__ALLOW_ANONYMOUS=true" in str(caught.value)
    create_app(from_env({}, server={"host": host, "allow_anonymous": True}))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_needs_no_keys(host: str) -> None:
    create_app(from_env({}, server={"host": host}))


def test_an_unreadable_keys_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read the keys file"):
        create_app(from_env({}, server={"api_keys_file": str(tmp_path / "missing")}))


def test_the_client_and_the_cli_send_the_key(
    live: str, secrets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(live, api_key=secrets["bob"]) as client:
        assert client.run("print(1)").status == "succeeded"
    with Client(live, api_key="wrong") as client, pytest.raises(ProblemError) as caught:
        client.run("print(1)")
    assert caught.value.status == 401
    script = tmp_path / "main.py"
    script.write_text("print(1)")
    assert main(["run", "--server", live, str(script)]) == 125
    assert "401 Unauthorized" in capsys.readouterr().err
    assert main(["run", "--server", live, "--api-key", secrets["alice"], str(script)]) == 0


def test_serve_refuses_an_exposed_address_before_anything_else(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert "WARMPOD_SERVER__API_KEYS_FILE" in capsys.readouterr().err
