"""Where webhooks may go: the operator's allow-list of URL prefixes, checked at submission and
again at each delivery, after the name is resolved, so a webhook cannot reach inside the network."""

from __future__ import annotations

import functools
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

import anyio

from warmpod.errors import InvalidCallback, SettingsError

RESOLVERS = 4
"""Name resolutions of deliveries at once."""
MAX_URL = 2048
"""Longest ``callback_url`` taken, in characters."""
_PORTS = {"http": 80, "https": 443}
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Prefix:
    """One entry of the allow-list."""

    scheme: str
    host: str
    port: int
    path: str
    address: Address | None
    """The entry's host when it is an address: then that address is named, even a private one."""

    def covers(self, url: SplitResult) -> bool:
        """Whether ``url`` (checked by ``parse_url``) starts with this prefix: same scheme, host and
        port, and a path at or under the prefix's."""
        if (url.scheme, _host(url), _port(url)) != (self.scheme, self.host, self.port):
            return False
        path = url.path or "/"
        return path == self.path or path.startswith(self.path if self.path.endswith("/") else self.path + "/")


@dataclass(frozen=True)
class Target:
    """Where one delivery connects: an address checked against the allow-list, and the URL's
    host and port for the request's ``Host`` and TLS name."""

    url: str
    address: Address
    host: str
    port: int


class Destinations:
    """The allow-list (``WARMPOD_WEBHOOKS__ALLOW``): empty, no webhooks at all."""

    def __init__(self, allow: tuple[str, ...]) -> None:
        """Raises:
        SettingsError: an entry is not an ``http`` or ``https`` URL without user or query.
        """
        self._prefixes: list[Prefix] = []
        self._resolvers = anyio.CapacityLimiter(RESOLVERS)
        for entry in allow:
            try:
                url = parse_url(entry)
            except InvalidCallback as exc:
                raise SettingsError(f"WARMPOD_WEBHOOKS__ALLOW entry {entry[:100]!r}: {exc}") from None
            host = _host(url)
            self._prefixes.append(Prefix(url.scheme, host, _port(url), url.path or "/", _address(host)))

    @property
    def enabled(self) -> bool:
        """Whether any webhook may go anywhere."""
        return bool(self._prefixes)

    def check(self, url: str) -> str:
        """``url`` if the allow-list lets it through (as far as can be told before its name is resolved).

        Raises:
            InvalidCallback: webhooks are off, or the URL is malformed or outside every prefix.
        """
        if not self._prefixes:
            raise InvalidCallback("this server sends no webhooks: WARMPOD_WEBHOOKS__ALLOW is empty")
        self._prefix(parse_url(url))
        return url

    async def target(self, url: str) -> Target:
        """Where a delivery to ``url`` connects, resolved now: every address the name has must be
        public, or named by the prefix that covers the URL; the first is used, so the request goes
        to the address checked, not to whatever a second resolution answers.

        Raises:
            InvalidCallback: the URL is no longer allowed, its name does not resolve, or it resolves to an
                address the allow-list does not name.
        """
        parts = parse_url(url)
        prefix = self._prefix(parts)
        host, port = _host(parts), _port(parts)
        literal = _address(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                # Threads of their own: a resolver that hangs holds these, never the ones the
                # pool and the runs use, and the try's time-out gives up waiting on it.
                found = await anyio.to_thread.run_sync(
                    functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM),
                    abandon_on_cancel=True,
                    limiter=self._resolvers,
                )
            except OSError as exc:
                raise InvalidCallback(f"the name {host!r} does not resolve: {exc}") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))
        barred = [
            str(address) for address in addresses if not address.is_global and address != prefix.address
        ]
        if barred:
            raise InvalidCallback(
                f"{host!r} resolves to {', '.join(barred)}: not public, and WARMPOD_WEBHOOKS__ALLOW "
                "does not name the address"
            )
        if not addresses:
            raise InvalidCallback(f"the name {host!r} has no address")
        return Target(url=url, address=addresses[0], host=host, port=port)

    def _prefix(self, url: SplitResult) -> Prefix:
        for prefix in self._prefixes:
            if prefix.covers(url):
                return prefix
        raise InvalidCallback(
            "the URL is outside WARMPOD_WEBHOOKS__ALLOW, the server's allowed webhook destinations"
        )


def parse_url(url: str) -> SplitResult:
    """``url`` split, once it is a plain absolute ``http``/``https`` URL.

    Raises:
        InvalidCallback: it is not.
    """
    if len(url) > MAX_URL:
        raise InvalidCallback(f"the URL is longer than {MAX_URL} characters")
    # Parsers disagree on a backslash (WHATWG reads it as '/'): the URL checked must be the URL sent.
    if not url.isascii() or not url.isprintable() or " " in url or "\\" in url:
        raise InvalidCallback(
            "the URL must be printable ASCII without spaces or backslashes (percent-encode the rest)"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port out of range)
    except ValueError as exc:
        raise InvalidCallback(f"the URL is malformed: {exc}") from None
    if parts.scheme not in _PORTS:
        raise InvalidCallback("the URL must be http:// or https://")
    if not parts.hostname:
        raise InvalidCallback("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidCallback("the URL must not carry a user or password")
    if parts.fragment:
        raise InvalidCallback("the URL must not have a #fragment")
    # A client normalises "..", so "/hooks/../admin" would leave the prefix's path after the check.
    if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
        raise InvalidCallback("the URL's path must not have '.' or '..' segments")
    return parts


def _host(url: SplitResult) -> str:
    host = url.hostname or ""
    address = _address(host)
    return host.rstrip(".").lower() if address is None else str(address)


def _port(url: SplitResult) -> int:
    return url.port or _PORTS[url.scheme]


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
