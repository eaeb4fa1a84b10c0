"""Network: only a private loopback, no route or resolver, no dangerous socket families, no way to the host.

Nothing here connects anywhere but loopback: the sandbox only tries to create vsock, packet,
netlink and raw sockets, and its connections to 127.0.0.1 stay in its own network namespace.
"""

from __future__ import annotations

import errno
import socket
import uuid
from textwrap import dedent
from urllib.parse import urlsplit

import httpx
import pytest
from support.hostile import assert_still_serves, run
from support.live import WarmpodServer

pytestmark = pytest.mark.security


def test_only_loopback_and_no_route_or_resolver(client: httpx.Client) -> None:
    """The sandbox has only `lo`, no IPv4 route, IPv6 routes only via `lo`, and no name resolution."""
    code = dedent(
        """
        import json, os, socket
        out = {"interfaces": sorted(os.listdir("/sys/class/net"))}
        with open("/proc/net/route") as f:
            out["routes"] = f.read().splitlines()[1:]
        with open("/proc/net/ipv6_route") as f:
            out["route6_devices"] = sorted({line.split()[-1] for line in f})
        with open("/etc/resolv.conf") as f:
            out["nameservers"] = [l for l in f.read().splitlines() if l.split()[:1] == ["nameserver"]]
        # Only without a nameserver, where the query cannot leave the sandbox's own loopback.
        if not out["nameservers"]:
            try:
                socket.getaddrinfo("example.com", 443)
                out["resolved"] = True
            except socket.gaierror:
                out["resolved"] = False
        print(json.dumps(out))
        """
    )
    probe = run(client, code)
    assert probe.status == "succeeded", probe.result
    assert probe.report() == {
        "interfaces": ["lo"],
        "routes": [],
        "route6_devices": ["lo"],
        "nameservers": [],
        "resolved": False,
    }
    assert_still_serves(client)


def test_dangerous_socket_families_cannot_be_created(client: httpx.Client) -> None:
    """vsock, packet, netlink, crypto and raw sockets fail at creation; plain TCP and UDP sockets do not."""
    code = dedent(
        """
        import errno, json, socket
        out = {}
        # Creation only: nothing is ever bound, sent or connected.
        for name, args in {
            "vsock": (socket.AF_VSOCK, socket.SOCK_STREAM),
            "vsock dgram": (socket.AF_VSOCK, socket.SOCK_DGRAM),
            "packet": (socket.AF_PACKET, socket.SOCK_RAW, 0),
            "netlink": (socket.AF_NETLINK, socket.SOCK_RAW, 0),
            "alg": (socket.AF_ALG, socket.SOCK_SEQPACKET, 0),
            "raw ipv4": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
            "raw ipv6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
            "raw nonblocking": (socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.IPPROTO_TCP),
            "sctp": (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP),
            "tcp": (socket.AF_INET, socket.SOCK_STREAM),
            "udp6": (socket.AF_INET6, socket.SOCK_DGRAM),
        }.items():
            try:
                socket.socket(*args).close()
                out[name] = "created"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        print(json.dumps(out))
        """
    )
    probe = run(client, code)
    assert probe.status == "succeeded", probe.result
    family, raw = errno.errorcode[errno.EAFNOSUPPORT], errno.errorcode[errno.EPERM]
    assert probe.report() == {
        "vsock": family,
        "vsock dgram": family,
        "packet": family,
        "netlink": family,
        "alg": family,
        "raw ipv4": raw,
        "raw ipv6": raw,
        "raw nonblocking": raw,
        "sctp": errno.errorcode[errno.ENOSYS],
        "tcp": "created",
        "udp6": "created",
    }
    assert_still_serves(client)


def test_host_loopback_is_unreachable(server: WarmpodServer, client: httpx.Client) -> None:
    """Connecting to host listeners on 127.0.0.1 and abstract unix sockets reaches only the sandbox's own."""
    abstract = f"\0warmpod-security-{uuid.uuid4().hex}"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
    ):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        unix.bind(abstract)
        unix.listen()
        for listener in (tcp, udp, unix):
            listener.setblocking(False)
        api_port = urlsplit(server.url).port
        code = dedent(
            f"""
            import errno, json, socket
            out = {{}}
            for name, family, address in (
                ("tcp", socket.AF_INET, ("127.0.0.1", {tcp.getsockname()[1]})),
                ("warmpod api", socket.AF_INET, ("127.0.0.1", {api_port})),
                ("abstract unix", socket.AF_UNIX, {abstract!r}),
            ):
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    try:
                        s.connect(address)
                        out[name] = "connected"
                    except OSError as exc:
                        out[name] = errno.errorcode.get(exc.errno, repr(exc))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"hello host", ("127.0.0.1", {udp.getsockname()[1]}))
            print(json.dumps(out))
            """
        )
        probe = run(client, code)
        assert probe.status == "succeeded", probe.result
        refused = errno.errorcode[errno.ECONNREFUSED]
        assert probe.report() == {"tcp": refused, "warmpod api": refused, "abstract unix": refused}
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recvfrom(1024)
        with pytest.raises(BlockingIOError):
            unix.accept()
    assert_still_serves(client)
