"""The webhook allow-list: prefixes matched by scheme, host, port and path; malformed URLs
refused; at delivery, names resolved and non-public addresses refused unless an entry names them."""

from __future__ import annotations

import pytest

from warmpod.errors import InvalidCallback, SettingsError
from warmpod.webhooks.destinations import MAX_URL, Destinations

ALLOW = ("https://hooks.example.com/warmpod/", "http://127.0.0.1:8123/", "http://localhost:8124/in")


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/warmpod/",
        "https://hooks.example.com/warmpod/team-a?x=1",
        "https://HOOKS.example.com:443/warmpod/x",
        "http://127.0.0.1:8123/anything",
        "http://localhost:8124/in",
        "http://localhost:8124/in/deeper",
    ],
)
def test_urls_under_a_prefix_pass(url: str) -> None:
    assert Destinations(ALLOW).check(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/other/",
        "https://hooks.example.com.evil.test/warmpod/",
        "http://hooks.example.com/warmpod/",
        "https://hooks.example.com:8443/warmpod/",
        "http://127.0.0.1:8124/",
        "http://localhost:8124/inside",
        "http://user:pw@127.0.0.1:8123/",
        "ftp://127.0.0.1:8123/",
        "http://127.0.0.1:8123/#frag",
        "http://127.0.0.1:8123/ space",
        "http://127.0.0.1:99999/",
        "/relative",
        "http://127.0.0.1:8123/" + "a" * MAX_URL,
        "https://hooks.example.com/warmpod/../admin",
        "https://hooks.example.com/warmpod/%2e%2E/admin",
        "https://hooks.example.com/warmpod/./x",
        "http://127.0.0.1:8123\\@hooks.example.com/warmpod/",
    ],
)
def test_urls_outside_or_malformed_are_refused(url: str) -> None:
    with pytest.raises(InvalidCallback):
        Destinations(ALLOW).check(url)


def test_an_empty_allow_list_refuses_everything() -> None:
    with pytest.raises(InvalidCallback, match="no webhooks"):
        Destinations(()).check("http://127.0.0.1:8123/")


def test_a_malformed_entry_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="WARMPOD_WEBHOOKS__ALLOW"):
        Destinations(("not a url",))


async def test_an_address_the_entry_names_is_allowed() -> None:
    target = await Destinations(ALLOW).target("http://127.0.0.1:8123/x")
    assert (str(target.address), target.port) == ("127.0.0.1", 8123)


async def test_a_name_resolving_to_loopback_is_refused() -> None:
    """``localhost`` is allowed by name, but its address is loopback and no entry names it."""
    with pytest.raises(InvalidCallback, match="not public"):
        await Destinations(ALLOW).target("http://localhost:8124/in")


async def test_a_url_no_longer_allowed_is_refused_at_delivery() -> None:
    with pytest.raises(InvalidCallback, match="outside"):
        await Destinations(ALLOW[:1]).target("http://127.0.0.1:8123/x")
