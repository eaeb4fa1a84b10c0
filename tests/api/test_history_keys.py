"""``GET /runs`` with keys on: a key sees its own runs only, whatever cursor it sends."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import MAX_BODY, MAX_QUEUED, POOL_SIZE, bearer

from warmpod import keys
from warmpod.http.history import encode_cursor
from warmpod.queue.store.base import Position
from warmpod.settings import Settings, from_env


@pytest.fixture
def secrets(tmp_path: Path) -> dict[str, str]:
    """Two keys, as `warmpod keys add` printed them."""
    key_file = tmp_path / "keys"
    return {"alice": keys.add(key_file, "alice"), "bob": keys.add(key_file, "bob")}


@pytest.fixture
def settings(tmp_path: Path, secrets: dict[str, str]) -> Settings:
    """The API suite's settings with the keys file on."""
    return from_env(
        {},
        server={"max_body_bytes": MAX_BODY, "api_keys_file": str(tmp_path / "keys")},
        pool={"size": POOL_SIZE},
        queue={"max_queued": MAX_QUEUED},
    )


async def test_a_key_lists_only_its_own_runs_even_by_another_keys_cursor(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]
) -> None:
    """Alice and Bob each run twice with the same label: each lists only its own runs, by label
    too, and a cursor made from the position of Bob's newest run shows Alice only hers."""
    alice, bob = bearer(secrets["alice"]), bearer(secrets["bob"])
    mine: dict[str, list[str]] = {"alice": [], "bob": []}
    for who, headers in (("alice", alice), ("bob", bob), ("alice", alice), ("bob", bob)):
        response = await anonymous.post(
            "/run-json/", json={"code": "1", "labels": {"team": "shared"}}, headers=headers
        )
        assert response.status_code == 200, response.text
        mine[who].append(response.json()["id"])
    for who, headers in (("alice", alice), ("bob", bob)):
        listed = await anonymous.get("/runs", params={"label": "team=shared"}, headers=headers)
        assert [run["id"] for run in listed.json()["runs"]] == mine[who][::-1]
    newest_bob = (await anonymous.get("/runs", params={"limit": "1"}, headers=bob)).json()["runs"][0]
    assert newest_bob["id"] == mine["bob"][1]
    # A cursor just past Bob's newest run (its row number is not known here: any will do).
    forged = encode_cursor(Position(newest_bob["created"] + 1, 10**9))
    page = await anonymous.get("/runs", params={"cursor": forged}, headers=alice)
    assert [run["id"] for run in page.json()["runs"]] == mine["alice"][::-1]
    assert (await anonymous.get("/runs")).status_code == 401
