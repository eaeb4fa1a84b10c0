"""Unit tests of the secrets file: its format, its mode, who may use what, and rotation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warmpod import keys
from warmpod.errors import SecretDenied, SettingsError
from warmpod.secrets import Secrets, parse


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    """Replace ``path`` with ``text`` at ``mode``, as an editor saving a new file would."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.chmod(mode)
    os.replace(temporary, path)
    return path


def test_lines_are_name_equals_value_with_comments_and_blanks() -> None:
    """A value keeps everything after the first '=', '=' and spaces inside it included."""
    text = "# the warehouse\n\nWAREHOUSE_DSN=postgresql://u:p@db/x?a=b\nTOKEN = abc def\n"
    assert parse(text, "f") == {"WAREHOUSE_DSN": "postgresql://u:p@db/x?a=b", "TOKEN": " abc def"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("NOEQUALS\n", ["line 1", "NAME=value"]),
        ("PATH=/usr/bin/x\n", ["line 1", "PATH", "reserved"]),
        ("A=abcd\nA=efgh\n", ["line 2", "twice"]),
        ("A=abc\n", ["line 1", "'A'", "4 to 4096"]),
    ],
)
def test_a_malformed_file_names_the_line_never_a_value(text: str, words: list[str]) -> None:
    """Each malformed line is a SettingsError naming its line (and the secret), not its value."""
    with pytest.raises(SettingsError) as caught:
        parse(text, "f")
    for word in words:
        assert word in str(caught.value)
    assert "/usr/bin/x" not in str(caught.value)


def test_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    """The secrets file must be 0600: one group or others may read stops the server from starting."""
    path = write(tmp_path / "secrets", "A=abcdef\n", 0o640)
    with pytest.raises(SettingsError, match="chmod 600"):
        Secrets(path)


def test_keys_use_only_the_secrets_granted_to_them(tmp_path: Path) -> None:
    """With a keys file a key may ask only for its granted secrets; without one, for any; never for
    one the file does not hold."""
    secrets = Secrets(write(tmp_path / "secrets", "A=abcdef\nB=ghijkl\n"))
    key_file = tmp_path / "keys"
    keys.add(key_file, "ops", granted=frozenset({"A"}))
    (ops,) = keys.KeyFile(key_file).current()
    assert ops.secrets == frozenset({"A"})
    secrets.check(["A"], ops, keyed=True)
    with pytest.raises(SecretDenied, match="may not use the secret 'B'"):
        secrets.check(["B"], ops, keyed=True)
    secrets.check(["A", "B"], None, keyed=False)
    with pytest.raises(SecretDenied, match="no secret named 'C'"):
        secrets.check(["C"], None, keyed=False)
    assert secrets.resolve(["B", "A"]) == [("B", "ghijkl"), ("A", "abcdef")]


def test_a_rotation_takes_effect_and_a_broken_edit_keeps_the_last_values(tmp_path: Path) -> None:
    """A changed file is read again at the next use; a malformed one leaves the last values in force."""
    path = write(tmp_path / "secrets", "A=first-value\n")
    secrets = Secrets(path)
    assert secrets.resolve(["A"]) == [("A", "first-value")]
    write(path, "A=second-value\n")
    assert secrets.resolve(["A"]) == [("A", "second-value")]
    write(path, "A=x\n")  # too short: malformed
    assert secrets.resolve(["A"]) == [("A", "second-value")]
    write(path, "B=other-value\n")
    with pytest.raises(SecretDenied, match="no longer"):
        secrets.resolve(["A"])


def test_no_secrets_file_means_no_secret_may_be_asked_for() -> None:
    """Without a secrets file every secret is unknown."""
    with pytest.raises(SecretDenied, match="no secret named 'A'"):
        Secrets(None).check(["A"], None, keyed=False)


def test_a_keys_file_line_carries_its_options_and_rejects_unknown_ones() -> None:
    """``NAME:HASH:max_active=N:secrets=A,B`` round-trips; an unknown or repeated option is an error."""
    digest = "0" * 64
    (key,) = keys.parse(f"ops:{digest}:max_active=2:secrets=B,A\n", "f")
    assert (key.max_active, key.secrets) == (2, frozenset({"A", "B"}))
    assert keys.parse(key.line(), "f") == [key]
    with pytest.raises(SettingsError, match="unknown option 'colour'"):
        keys.parse(f"ops:{digest}:colour=red\n", "f")
    with pytest.raises(SettingsError, match="given twice"):
        keys.parse(f"ops:{digest}:max_active=1:max_active=2\n", "f")
    with pytest.raises(SettingsError, match="reserved"):
        keys.parse(f"ops:{digest}:secrets=PATH\n", "f")
