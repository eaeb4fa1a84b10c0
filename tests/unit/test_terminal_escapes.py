"""A program's output on the user's terminal: control characters shown, not obeyed; piped, untouched."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

from warmpod import terminal

HOSTILE = "ok\x1b]0;owned\x07\x1b[2J\r\x08\x7f\x9b31m\u202eevil\u2066\x00\ttab\nnext é 日本\n"
SHOWN = "ok\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x08\\x7f\\x9b31m\\u202eevil\\u2066\\x00\ttab\nnext é 日本\n"


def test_control_characters_are_shown_as_escapes() -> None:
    """C0 controls (but newline and tab), DEL, C1 controls and bidi overrides become visible escapes;
    printable text, accents and wide characters stay as they are."""
    assert terminal.visible(HOSTILE) == SHOWN


def test_every_c0_and_c1_control_but_newline_and_tab_is_escaped() -> None:
    """No character below U+0020 (newline and tab aside), nor U+007F to U+009F, comes out raw."""
    controls = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))
    shown = terminal.visible(controls)
    assert {c for c in shown if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0} == {"\n", "\t"}


@pytest.fixture
def tty() -> Iterator[tuple[io.TextIOWrapper, int]]:
    """A text stream on a pseudo-terminal (isatty is true) and the terminal's other end."""
    controller, device = os.openpty()
    with open(device, "w", encoding="utf-8") as stream, os.fdopen(controller, "rb", buffering=0) as reader:
        yield stream, reader.fileno()


def read_all(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd`` (a terminal may hand them over in pieces)."""
    data = b""
    while len(data) < size:
        data += os.read(fd, size - len(data))
    return data


def test_output_to_a_terminal_is_escaped(tty: tuple[io.TextIOWrapper, int]) -> None:
    """What ``warmpod run`` and ``warmpod logs`` write to a terminal carries no escape sequence."""
    stream, controller = tty
    text = "a\x1b[31mb\n"
    terminal._write(stream, text)
    # The terminal's line discipline turns each \n into \r\n on its way to the reader.
    expected = terminal.visible(text).replace("\n", "\r\n").encode()
    assert read_all(controller, len(expected)) == expected


def test_output_to_a_pipe_is_passed_on_byte_for_byte() -> None:
    """Piped or redirected, a program's output is written exactly as it printed it."""
    read_end, write_end = os.pipe()
    with open(write_end, "w", encoding="utf-8") as stream, os.fdopen(read_end, "rb") as reader:
        terminal._write(stream, HOSTILE)
        stream.close()
        assert reader.read() == HOSTILE.encode()
