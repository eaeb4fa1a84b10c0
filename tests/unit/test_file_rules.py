"""Unit tests of a run's file rules: which input paths are allowed, and what an agent may send back."""

from __future__ import annotations

import pytest

from warmpod.errors import InvalidFile, ProtocolError
from warmpod.models import InputFile, OutputFile
from warmpod.sandbox.files import (
    OutputFiles,
    check_inputs,
    decode_inputs,
    media_type,
    path_problem,
    with_content,
)
from warmpod.settings import FileSettings

LIMITS = FileSettings(in_count=3, in_file_bytes=10, in_bytes=15, out_count=2, out_bytes=10)


@pytest.mark.parametrize(
    "path", ["a", "data/sales.csv", "é/ü.csv", "a b", ".hidden", "a..b", "...", "x" * 255, "a/" * 500 + "b"]
)
def test_ordinary_relative_paths_are_allowed(path: str) -> None:
    """Relative POSIX paths in UTF-8, dotfiles and names with dots in them included, break no rule."""
    assert path_problem(path) is None


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("", "empty"),
        ("/a", "absolute"),
        ("a/../b", "'..'"),
        ("a\\b", "backslash"),
        ("a\0", "NUL"),
        (".", "'.'"),
        ("a/./b", "'.'"),
        ("a//b", "empty"),
        ("\ud800", "UTF-8"),
        ("é" * 128, "255 bytes"),
        ("a" * 1025, "1024"),
    ],
)
def test_each_broken_rule_is_named(path: str, rule: str) -> None:
    """Each rule a path breaks is named in words a client can act on."""
    problem = path_problem(path)
    assert problem is not None
    assert rule in problem


def test_inputs_keep_their_order_and_caps_name_their_maximum() -> None:
    """Allowed files come back as given; more files, a larger file or more bytes than allowed raise
    InvalidFile naming the maximum and its setting."""
    files = [("b", b"1"), ("a/c", b"22")]
    assert check_inputs(files, LIMITS) == tuple(files)
    with pytest.raises(InvalidFile, match=r"at most 3 .*WARMPOD_FILES__IN_COUNT"):
        check_inputs([(f"f{i}", b"") for i in range(4)], LIMITS)
    with pytest.raises(InvalidFile, match="'big' has 11 bytes; at most 10"):
        check_inputs([("big", b"x" * 11)], LIMITS)
    with pytest.raises(InvalidFile, match="16 bytes together; at most 15"):
        check_inputs([("a", b"x" * 8), ("b", b"x" * 8)], LIMITS)


def test_base64_is_decoded_strictly() -> None:
    """Content must be canonical base64: padding, alphabet and no whitespace."""
    assert decode_inputs([InputFile(path="a", content="aGk=")]) == [("a", b"hi")]
    for bad in ("aGk", "aGk=\n", "a Gk=", "aG!k", "aGk==="):
        with pytest.raises(InvalidFile, match="'a' is not valid base64"):
            decode_inputs([InputFile(path="a", content=bad)])


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("out/chart.png", "image/png"),
        ("out/t.csv", "text/csv"),
        ("out/r.html", "text/html"),
        ("out/d.parquet", "application/octet-stream"),
        ("out/x.csv.gz", "application/octet-stream"),
        ("out/noext", "application/octet-stream"),
    ],
)
def test_media_type_comes_from_the_name(path: str, expected: str) -> None:
    """The media type is guessed from the name alone; compressed or unknown names are octet-stream."""
    assert media_type(path) == expected


def test_content_is_inline_only_up_to_the_cap() -> None:
    """A file at most the inline cap gets its base64 content; a larger one keeps content null."""
    entry = OutputFile(path="out/a", size=3, media_type="text/plain")
    assert with_content(entry, b"abc", 3).content == "YWJj"
    assert with_content(entry, b"abc", 2).content is None


def test_an_agent_is_held_to_the_file_caps() -> None:
    """More files or bytes than the run allows, or a file sent again, is a protocol error."""
    files = OutputFiles(LIMITS)
    files.add("out/a", b"12345", end=True)
    files.add("out/b", b"123", end=False)
    with pytest.raises(ProtocolError, match="more than 2 files"):
        files.add("out/c", b"", end=True)
    with pytest.raises(ProtocolError, match="more than 10 bytes"):
        files.add("out/b", b"123", end=True)
    with pytest.raises(ProtocolError, match="twice"):
        files.add("out/a", b"", end=True)


def test_complete_files_are_in_path_order() -> None:
    """Only files whose last piece came are complete, sorted by path whatever order they came in."""
    files = OutputFiles(FileSettings(out_count=5, out_bytes=100))
    assert not files.started
    files.add("out/z", b"z", end=True)
    files.add("out/m", b"m", end=False)
    files.add("out/a", b"a", end=True)
    assert files.started
    assert [f.path for f in files.complete] == ["out/a", "out/z"]
    assert [f.path for f in files.describe()] == ["out/a", "out/z"]
