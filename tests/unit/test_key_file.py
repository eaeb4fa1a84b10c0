"""The keys file and `warmpod keys`: what is written, what is refused, what is never shown."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from warmpod import keys
from warmpod.cli import main
from warmpod.errors import SettingsError


def test_add_prints_a_fresh_key_once_and_keeps_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "conf" / "keys"
    assert main(["keys", "add", "reports", "--file", str(path), "--max-active", "3"]) == 0
    key = capsys.readouterr().out.strip()
    # 32 random bytes, URL-safe base64: safe in a header, a URL or a shell variable.
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"reports:{keys.digest(key)}:max_active=3\n"
    assert key not in path.read_text()
    assert main(["keys", "add", "other", "--file", str(path), "--secrets", "B_DSN,A_TOKEN"]) == 0
    other = capsys.readouterr().out.strip()
    assert other != key
    assert path.read_text().splitlines()[1] == f"other:{keys.digest(other)}:secrets=A_TOKEN,B_DSN"
    assert main(["keys", "list", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert listed == (
        "reports\tmax_active=3\tsecrets=-\tsources=-\tenvironments=*\n"
        "other\tno limit\tsecrets=A_TOKEN,B_DSN\tsources=-\tenvironments=*\n"
    )
    assert keys.digest(key) not in listed


def test_add_grants_sources_and_list_shows_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--sources a,b`` writes ``sources=`` on the key's line and ``list`` shows them; a name that
    is not a source's is refused before anything is written."""
    path = tmp_path / "keys"
    argv = ["keys", "add", "reports", "--file", str(path), "--secrets", "DSN", "--sources", "warehouse, crm"]
    assert main(argv) == 0
    key = capsys.readouterr().out.strip()
    assert path.read_text() == f"reports:{keys.digest(key)}:secrets=DSN:sources=crm,warehouse\n"
    assert main(["keys", "list", "--file", str(path)]) == 0
    assert (
        capsys.readouterr().out == "reports\tno limit\tsecrets=DSN\tsources=crm,warehouse\tenvironments=*\n"
    )
    assert main(["keys", "add", "other", "--file", str(path), "--sources", "Warehouse"]) == 1
    assert "--sources: the source name 'Warehouse'" in capsys.readouterr().err
    assert [k.name for k in keys.KeyFile(path).current()] == ["reports"]


def test_add_limits_environments_and_list_shows_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--environments a,b`` writes ``environments=`` on the key's line and ``list`` shows them; a
    name that is not an environment's, or an empty list, is refused before anything is written."""
    path = tmp_path / "keys"
    argv = ["keys", "add", "quant", "--file", str(path), "--environments", "finance, default"]
    assert main(argv) == 0
    key = capsys.readouterr().out.strip()
    assert path.read_text() == f"quant:{keys.digest(key)}:environments=default,finance\n"
    (found,) = keys.KeyFile(path).current()
    assert found.environments == frozenset({"default", "finance"})
    assert main(["keys", "list", "--file", str(path)]) == 0
    assert capsys.readouterr().out == "quant\tno limit\tsecrets=-\tsources=-\tenvironments=default,finance\n"
    assert main(["keys", "add", "other", "--file", str(path), "--environments", "Finance"]) == 1
    assert "--environments: the environment name 'Finance'" in capsys.readouterr().err
    assert main(["keys", "add", "other", "--file", str(path), "--environments", " , "]) == 1
    assert "leave it out for every one" in capsys.readouterr().err
    assert [k.name for k in keys.KeyFile(path).current()] == ["quant"]


def test_environments_option_of_a_key_line() -> None:
    """``environments=a,b`` limits a key to those environments; a key without it may use every one."""
    text = f"all:{'a' * 64}\nsome:{'b' * 64}:sources=crm:environments=ml-gpu,default:max_active=2\n"
    every, some = keys.parse(text, "keys")
    assert every.environments is None
    assert some.environments == frozenset({"ml-gpu", "default"})
    assert (some.sources, some.max_active) == (frozenset({"crm"}), 2)
    assert keys.parse(some.line(), "keys") == [some]
    assert keys.parse(every.line(), "keys") == [every]


def test_remove_and_the_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys"
    keys.add(path, "a")
    keys.add(path, "b")
    assert main(["keys", "remove", "a", "--file", str(path)]) == 0
    assert [key.name for key in keys.KeyFile(path).current()] == ["b"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(["keys", "remove", "a", "--file", str(path)]) == 1
    assert "no key named 'a'" in capsys.readouterr().err
    assert main(["keys", "add", "b", "--file", str(path)]) == 1
    assert "already has a key named 'b'" in capsys.readouterr().err
    assert main(["keys", "add", "bad name", "--file", str(path)]) == 1
    assert main(["keys", "add", "c", "--file", str(path), "--max-active", "0"]) == 2
    assert main(["keys", "list"]) == 2  # no file named anywhere


@pytest.mark.parametrize(
    "line",
    [
        "nohash",
        "name:" + "a" * 63,
        "name:" + "A" * 64,
        "na me:" + "a" * 64,
        "name:" + "a" * 64 + ":max_active=0",
        "name:" + "a" * 64 + ":quota=3",
        "name:" + "a" * 64 + ":environments=",
        "name:" + "a" * 64 + ":environments=Finance",
        "name:" + "a" * 64 + ":environments=9lives",
        "name:" + "a" * 64 + ":environments=a:environments=b",
    ],
)
def test_a_malformed_line_is_refused_by_number_without_its_hash(line: str) -> None:
    with pytest.raises(SettingsError, match="keys line 2") as caught:
        keys.parse(f"# a comment\n{line}\n", "keys")
    assert "a" * 63 not in str(caught.value)


def test_a_repeated_name_is_refused() -> None:
    text = f"x:{'a' * 64}\nx:{'b' * 64}\n"
    with pytest.raises(SettingsError, match="given twice"):
        keys.parse(text, "keys")


def test_find_matches_the_hash_and_sees_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    first = keys.add(path, "first")
    keys_file = keys.KeyFile(path)
    found = keys_file.find(first)
    assert found is not None
    assert found.name == "first"
    assert keys_file.find(first[:-1]) is None
    second = keys.add(path, "second")
    assert keys_file.find(second) is None  # not looked at again yet
    keys_file.current()
    found = keys_file.find(second)
    assert found is not None
    assert found.name == "second"


def test_a_new_key_never_starts_with_a_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key starting with '-' would read as an option (`--api-key -Gx...`): one is drawn again."""
    drawn = iter(["-Gstarts-with-a-dash", "Good-key"])
    monkeypatch.setattr("warmpod.keys.secrets.token_urlsafe", lambda _: next(drawn))
    assert keys.add(tmp_path / "keys", "alice") == "Good-key"
