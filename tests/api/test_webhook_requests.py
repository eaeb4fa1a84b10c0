"""callback_url on the real app with an allow-list and keys: what is refused with a 422, what is
kept on the run as its ``webhook``, and a key's default endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import MAX_BODY, MAX_QUEUED, NODE, POOL_SIZE, assert_problem, bearer, has_status
from support.fakes import RecordingRunner
from support.live import free_port
from support.waiting import until
from support.webhooks import WEBHOOK_FIELDS

from warmpod import keys
from warmpod.client.webhooks import new_secret
from warmpod.settings import Settings, from_env

# Nothing listens there: should the app try a delivery, it is refused by this machine's kernel.
PORT = free_port()
PREFIX = f"http://127.0.0.1:{PORT}/hooks/"
OTHER_PORT = PORT + 1 if PORT < 65535 else PORT - 1
V6_PREFIX = f"http://[::1]:{PORT}/hooks/"
DEFAULT = f"{PREFIX}default"
MAX_URL = 2048
TOKENS = {"plain": "plain-key-for-webhook-tests-0001", "hooked": "hooked-key-for-webhook-tests-0002"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The API suite's settings with two loopback prefixes allowed and a keys file: ``plain``, and
    ``hooked`` with a signing secret and a default endpoint of its own."""
    key_file = tmp_path / "keys"
    # The webhook= option last: its URL holds colons of its own.
    key_file.write_text(
        f"plain:{keys.digest(TOKENS['plain'])}\n"
        f"hooked:{keys.digest(TOKENS['hooked'])}:webhook_secret={new_secret()}:webhook={DEFAULT}\n"
    )
    return from_env(
        {},
        server={"max_body_bytes": MAX_BODY, "api_keys_file": str(key_file)},
        pool={"size": POOL_SIZE},
        queue={"max_queued": MAX_QUEUED},
        node={"name": NODE},
        webhooks={"allow": [PREFIX, V6_PREFIX], "secrets": [new_secret()]},
    )


async def post_run(
    client: AsyncTestClient[Litestar], key: str = "plain", **fields: Any
) -> tuple[int, dict[str, Any]]:
    """POST a blocking run of ``key`` with ``fields``; its status code and JSON body."""
    response = await client.post(
        "/run-json/", json={"code": "print(1)", **fields}, headers=bearer(TOKENS[key])
    )
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def webhook_of(client: AsyncTestClient[Litestar], run_id: str, key: str = "plain") -> Any:
    """The ``webhook`` of the run's ``GET /status/{id}``."""
    response = await client.get(f"/status/{run_id}", headers=bearer(TOKENS[key]))
    assert response.status_code == 200, response.text
    return response.json()["webhook"]


def long_url(length: int) -> str:
    """A URL under the allowed prefix exactly ``length`` characters long."""
    return PREFIX + "a" * (length - len(PREFIX))


# Outside every prefix: the problem names the setting that says where webhooks may go.
OUTSIDE = ("WARMPOD_WEBHOOKS__ALLOW",)
REFUSED = [
    pytest.param(f"http://127.0.0.1:{OTHER_PORT}/hooks/a", OUTSIDE, id="other-port"),
    pytest.param(f"https://127.0.0.1:{PORT}/hooks/a", OUTSIDE, id="other-scheme"),
    pytest.param(f"http://127.0.0.2:{PORT}/hooks/a", OUTSIDE, id="other-host"),
    pytest.param(f"http://localhost:{PORT}/hooks/a", OUTSIDE, id="a-name-for-the-address"),
    pytest.param(f"http://127.0.0.1:{PORT}/other/a", OUTSIDE, id="path-outside"),
    pytest.param(f"http://127.0.0.1:{PORT}/hooksx/a", OUTSIDE, id="path-prefix-of-a-segment"),
    pytest.param(f"http://127.0.0.1:{PORT}/hooks", OUTSIDE, id="path-above-the-prefix"),
    pytest.param(f"http://127.0.0.1:{PORT}/", OUTSIDE, id="root"),
    pytest.param(f"http://user:pw@127.0.0.1:{PORT}/hooks/a", (), id="userinfo"),
    pytest.param(f"http://user@127.0.0.1:{PORT}/hooks/a", (), id="user-only"),
    pytest.param(f"ftp://127.0.0.1:{PORT}/hooks/a", (), id="ftp"),
    pytest.param("javascript:alert(1)", (), id="javascript"),
    pytest.param(f"//127.0.0.1:{PORT}/hooks/a", (), id="no-scheme"),
    pytest.param("/hooks/a", (), id="relative"),
    pytest.param("not a url", (), id="not-a-url"),
    pytest.param("", (), id="empty"),
    pytest.param(long_url(MAX_URL + 1), (str(MAX_URL),), id="too-long"),
]


@pytest.mark.parametrize(("url", "words"), REFUSED)
async def test_a_callback_url_the_allow_list_does_not_cover_is_a_422(
    anonymous: AsyncTestClient[Litestar], runner: RecordingRunner, url: str, words: tuple[str, ...]
) -> None:
    """Another port, scheme or host than an entry's (a name for an entry's address too), a path not
    under the entry's (a 422 naming WARMPOD_WEBHOOKS__ALLOW); userinfo, a scheme not http(s), no
    URL at all, or one past 2048 characters (naming the maximum): a 422 problem, in JSON and in a
    form, and nothing runs."""
    response = await anonymous.post(
        "/run-json/", json={"code": "print(1)", "callback_url": url}, headers=bearer(TOKENS["plain"])
    )
    assert_problem(response, 422, *words)
    # An empty form field is what a form sends for a field left blank: not asserted either way.
    if url:
        form = await anonymous.post(
            "/run-file/",
            files={"file": ("main.py", b"print(1)")},
            data={"callback_url": url},
            headers=bearer(TOKENS["plain"]),
        )
        assert_problem(form, 422, *words)
    assert runner.calls == []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"{PREFIX}a", id="under-the-prefix"),
        pytest.param(f"{PREFIX}deep/er/path?run=1&x=%20", id="deeper-with-a-query"),
        pytest.param(PREFIX, id="the-prefix-itself"),
        pytest.param(f"{V6_PREFIX}a", id="ipv6-literal"),
        pytest.param(long_url(MAX_URL), id="2048-characters"),
    ],
)
async def test_an_allowed_callback_url_is_kept_on_the_run(
    anonymous: AsyncTestClient[Litestar], url: str
) -> None:
    """An allowed callback_url runs, and the final run's status shows its ``webhook``: that URL,
    pending (nothing listens there), never answered nor delivered."""
    status, body = await post_run(anonymous, callback_url=url)
    assert status == 200, body
    assert body["status"] == "succeeded"
    webhook = await webhook_of(anonymous, body["id"])
    assert set(webhook) == WEBHOOK_FIELDS, webhook
    assert webhook["url"] == url
    assert webhook["state"] == "pending", webhook
    assert (webhook["last_status"], webhook["delivered_at"]) == (None, None), webhook
    assert isinstance(webhook["attempts"], int), webhook


async def test_a_form_s_callback_url_is_kept_on_the_run(anonymous: AsyncTestClient[Litestar]) -> None:
    """/run-file/'s ``callback_url`` field is the JSON field's twin."""
    url = f"{PREFIX}form"
    response = await anonymous.post(
        "/run-file/",
        files={"file": ("main.py", b"print(1)")},
        data={"callback_url": url},
        headers=bearer(TOKENS["plain"]),
    )
    assert response.status_code == 200, response.text
    assert (await webhook_of(anonymous, response.json()["id"]))["url"] == url


async def test_a_webhook_waits_while_its_run_is_not_over(
    anonymous: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """While the run runs its webhook is ``waiting``, with no attempt; once it ends, ``pending``."""
    runner.hold = anyio.Event()
    url = f"{PREFIX}later"
    headers = bearer(TOKENS["plain"])
    accepted = await anonymous.post(
        "/run-json/", json={"code": "print(1)", "wait": False, "callback_url": url}, headers=headers
    )
    assert accepted.status_code == 202, accepted.text
    status_url = accepted.json()["status_url"]
    await until(lambda: has_status(anonymous, status_url, "running", headers))
    webhook = await webhook_of(anonymous, accepted.json()["id"])
    assert (webhook["url"], webhook["state"], webhook["attempts"]) == (url, "waiting", 0), webhook
    assert (webhook["last_status"], webhook["last_error"], webhook["delivered_at"]) == (None, None, None)
    runner.hold.set()
    await until(lambda: has_status(anonymous, status_url, "succeeded", headers))
    assert (await webhook_of(anonymous, accepted.json()["id"]))["state"] == "pending"


async def test_a_key_s_default_endpoint_is_used_unless_the_run_names_one_or_null(
    anonymous: AsyncTestClient[Litestar],
) -> None:
    """A run of ``hooked`` naming no callback_url gets the key's default endpoint; one naming
    another URL gets that; one naming null gets no webhook. ``plain`` has no default."""
    status, default = await post_run(anonymous, "hooked")
    assert status == 200, default
    assert (await webhook_of(anonymous, default["id"], "hooked"))["url"] == DEFAULT
    named_url = f"{PREFIX}named"
    status, named = await post_run(anonymous, "hooked", callback_url=named_url)
    assert status == 200, named
    assert (await webhook_of(anonymous, named["id"], "hooked"))["url"] == named_url
    status, opted_out = await post_run(anonymous, "hooked", callback_url=None)
    assert status == 200, opted_out
    assert await webhook_of(anonymous, opted_out["id"], "hooked") is None
    status, plain = await post_run(anonymous, "plain")
    assert status == 200, plain
    assert await webhook_of(anonymous, plain["id"]) is None


async def test_each_run_of_a_batch_has_its_own_webhook(client: AsyncTestClient[Litestar]) -> None:
    """A batch's runs name their own callback_url (or none, or the key's): each is kept with its
    run, and one outside the allow-list refuses the whole batch."""
    runs = [
        {"code": "print(1)", "callback_url": f"{PREFIX}a"},
        {"code": "print(2)", "callback_url": None},
        {"code": "print(3)"},
    ]
    response = await client.post("/runs/batch", json={"runs": runs}, headers=bearer(TOKENS["hooked"]))
    assert response.status_code == 202, response.text
    ids = [run["id"] for run in response.json()["runs"]]
    hooks = [await webhook_of(client, run_id, "hooked") for run_id in ids]
    assert [None if hook is None else hook["url"] for hook in hooks] == [f"{PREFIX}a", None, DEFAULT]
    refused = await client.post(
        "/runs/batch",
        json={"runs": [*runs, {"code": "print(4)", "callback_url": f"http://127.0.0.1:{OTHER_PORT}/"}]},
        headers=bearer(TOKENS["hooked"]),
    )
    assert refused.status_code == 422, refused.text
    assert "runs[3]" in refused.json()["detail"]
