"""Unit tests of the sources file: its format and limits, who may reach what, and rotation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warmpod import keys
from warmpod.errors import SettingsError, SourceDenied
from warmpod.sources import Source, Sources, host_problem, parse

WAREHOUSE = '[warehouse]\nhost = "db.internal"\nport = 5432\n'


def write(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text``, as an editor saving a new file would."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def test_a_table_per_source_with_the_contracts_defaults() -> None:
    """Each top-level table is a source; limits left out take the defaults the contract states."""
    text = WAREHOUSE + (
        '\n[crm_api]\nhost = "10.0.0.7"\nport = 8080\nmax_connections = 2\nmax_bytes_in = 1024\n'
        "max_bytes_out = 512\nidle_timeout = 3\nconnect_timeout = 0.5\n"
    )
    sources = parse(text, "f")
    assert sources["warehouse"] == Source(host="db.internal", port=5432)
    warehouse = sources["warehouse"]
    assert (warehouse.max_connections, warehouse.max_bytes_in, warehouse.max_bytes_out) == (
        4,
        256 << 20,
        16 << 20,
    )
    assert (warehouse.idle_timeout, warehouse.connect_timeout) == (30.0, 5.0)
    crm = sources["crm_api"]
    assert (crm.max_connections, crm.max_bytes_in, crm.max_bytes_out) == (2, 1024, 512)
    assert (crm.idle_timeout, crm.connect_timeout) == (3.0, 0.5)
    assert parse("# nothing declared\n", "f") == {}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[warehouse\n", ["not valid TOML"]),
        ('[Warehouse]\nhost = "db"\nport = 1\n', ["'Warehouse'", "lowercase"]),
        ('["1db"]\nhost = "db"\nport = 1\n', ["'1db'"]),
        (f'[{"a" * 33}]\nhost = "db"\nport = 1\n', ["1-32"]),
        ('warehouse = "db:5432"\n', ["'warehouse' must be a table"]),
        ('[warehouse]\nhost = "db"\n', ["'warehouse'", "port"]),
        ('[warehouse]\nhost = "db"\nport = 0\n', ["'warehouse'", "port"]),
        ('[warehouse]\nhost = "db"\nport = 65536\n', ["'warehouse'", "port"]),
        ('[warehouse]\nhost = "db"\nport = "5432"\n', ["'warehouse'", "port"]),
        ('[warehouse]\nhost = "db"\nport = 1\ncolour = "red"\n', ["'warehouse'", "colour"]),
        ('[warehouse]\nhost = "db"\nport = 1\nmax_connections = 0\n', ["max_connections"]),
        ('[warehouse]\nhost = "db"\nport = 1\nmax_connections = 65\n', ["max_connections"]),
        ('[warehouse]\nhost = "db"\nport = 1\nmax_bytes_in = 0\n', ["max_bytes_in"]),
        ('[warehouse]\nhost = "db"\nport = 1\nidle_timeout = 0\n', ["idle_timeout"]),
        ('[warehouse]\nhost = "db"\nport = 1\nconnect_timeout = -1\n', ["connect_timeout"]),
        ('[warehouse]\nhost = "db/x"\nport = 1\n', ["'warehouse'", "host name"]),
        ('[warehouse]\nhost = ""\nport = 1\n', ["'warehouse'", "host"]),
    ],
)
def test_a_malformed_file_is_refused_naming_the_source(text: str, words: list[str]) -> None:
    """Bad TOML, a bad name, a missing, unknown or out-of-range field is a SettingsError naming it."""
    with pytest.raises(SettingsError) as caught:
        parse(text, "sources.toml")
    assert "sources.toml" in str(caught.value)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("db.internal", True),
        ("localhost", True),
        ("127.0.0.1", True),
        ("::1", True),
        ("fd00::7", True),
        ("a-b.example.com", True),
        ("-bad.example", False),
        ("bad-.example", False),
        ("db..internal", False),
        ("db internal", False),
        ("db:5432", False),
        ("[::1]", False),
        ("x" * 64 + ".example", False),
        ("é.example", False),
    ],
)
def test_a_host_is_a_host_name_or_an_ip_address(host: str, allowed: bool) -> None:
    """A source's host is an IP address or an RFC 1123 host name; nothing with a port, a path or spaces."""
    assert (host_problem(host) is None) is allowed


def test_keys_reach_only_the_sources_granted_to_them(tmp_path: Path) -> None:
    """With a keys file a key may ask only for its granted sources; without one, for any declared;
    never for one the file does not declare."""
    sources = Sources(write(tmp_path / "sources.toml", WAREHOUSE + '[crm]\nhost = "crm"\nport = 443\n'))
    key_file = tmp_path / "keys"
    keys.add(key_file, "ops", sources=frozenset({"warehouse"}))
    (ops,) = keys.KeyFile(key_file).current()
    assert ops.sources == frozenset({"warehouse"})
    sources.check(["warehouse"], ops, keyed=True)
    with pytest.raises(SourceDenied, match="may not use the data source 'crm'"):
        sources.check(["crm"], ops, keyed=True)
    with pytest.raises(SourceDenied, match="may not use the data source 'warehouse'"):
        sources.check(["warehouse"], None, keyed=True)
    sources.check(["warehouse", "crm"], None, keyed=False)
    with pytest.raises(SourceDenied, match="no data source named 'ledger'"):
        sources.check(["ledger"], None, keyed=False)
    assert sources.resolve(["crm", "warehouse"]) == [
        ("crm", Source(host="crm", port=443)),
        ("warehouse", Source(host="db.internal", port=5432)),
    ]


def test_a_change_takes_effect_and_a_broken_edit_keeps_the_last_sources(tmp_path: Path) -> None:
    """A changed file is read again at the next use; a malformed one leaves the last sources in force."""
    path = write(tmp_path / "sources.toml", WAREHOUSE)
    sources = Sources(path)
    assert sources.resolve(["warehouse"]) == [("warehouse", Source(host="db.internal", port=5432))]
    write(path, '[warehouse]\nhost = "replica.internal"\nport = 5433\n')
    assert sources.resolve(["warehouse"]) == [("warehouse", Source(host="replica.internal", port=5433))]
    write(path, '[warehouse]\nhost = "replica.internal"\n')  # no port: malformed
    assert sources.resolve(["warehouse"]) == [("warehouse", Source(host="replica.internal", port=5433))]
    write(path, '[crm]\nhost = "crm"\nport = 443\n')
    with pytest.raises(SourceDenied, match="no longer"):
        sources.resolve(["warehouse"])


def test_an_unreadable_or_malformed_file_stops_the_start(tmp_path: Path) -> None:
    """A sources file that is missing or malformed at start-up is a SettingsError, not an empty list."""
    with pytest.raises(SettingsError, match="cannot read the sources file"):
        Sources(tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match="not valid TOML"):
        Sources(write(tmp_path / "sources.toml", "[warehouse\n"))


def test_no_sources_file_means_no_source_may_be_asked_for() -> None:
    """Without a sources file every source is unknown."""
    with pytest.raises(SourceDenied, match="no data source named 'warehouse'"):
        Sources(None).check(["warehouse"], None, keyed=False)


def test_a_keys_file_line_carries_sources_and_rejects_bad_names() -> None:
    """``sources=a,b`` round-trips through a key's line; a name that is not a source's is an error."""
    digest = "0" * 64
    (key,) = keys.parse(f"ops:{digest}:secrets=A:sources=warehouse,crm\n", "f")
    assert (key.secrets, key.sources) == (frozenset({"A"}), frozenset({"crm", "warehouse"}))
    assert keys.parse(key.line(), "f") == [key]
    with pytest.raises(SettingsError, match="source name 'Crm'"):
        keys.parse(f"ops:{digest}:sources=Crm\n", "f")
    with pytest.raises(SettingsError, match="given twice"):
        keys.parse(f"ops:{digest}:sources=a:sources=b\n", "f")
