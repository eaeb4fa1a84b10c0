"""Unit tests of secret masking: every whole value is ***, however the output is split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from warmpod.sandbox.masking import Masker

SECRET = "hunter2-swordfish"


def masked(masker: Masker, pieces: list[bytes], stream: str = "stdout") -> bytes:
    """What the reader sees of ``pieces`` written in order, the run then ended."""
    return b"".join(masker.feed(stream, piece) for piece in pieces) + masker.flush(stream)


def test_a_value_printed_whole_is_masked() -> None:
    """The value in one write becomes ***, the text around it stays."""
    assert masked(Masker([SECRET]), [f"dsn={SECRET};\n".encode()]) == b"dsn=***;\n"


def test_a_value_split_across_writes_is_masked_and_held_only_while_it_could_be_one() -> None:
    """The start of a value is held back until the next bytes tell; then shown, or masked."""
    masker = Masker([SECRET])
    assert masker.feed("stdout", b"x=hunter") == b"x="
    assert masker.feed("stdout", b"2-swordfish!") == b"***!"
    assert masker.feed("stdout", b"hunt") == b""
    assert masker.feed("stdout", b"ing\n") == b"hunting\n"


def test_streams_are_masked_apart() -> None:
    """A value's halves on stdout and stderr are two streams' text, not the value."""
    masker = Masker([SECRET])
    assert masker.feed("stdout", b"hunter2-") == b""
    assert masker.feed("stderr", b"swordfish\n") == b"swordfish\n"
    assert masker.flush("stdout") == b"hunter2-"


def test_a_value_containing_another_is_masked_whole() -> None:
    """Longest first: the longer value is one ***, not a *** inside its own text."""
    assert masked(Masker(["abcd", "xxabcdxx"]), [b"xxabcdxx abcd"]) == b"*** ***"


def test_no_secrets_changes_nothing() -> None:
    """Without values the bytes pass as they are, none held."""
    masker = Masker([])
    assert masker.feed("stdout", b"hunter2") == b"hunter2"
    assert masker.flush("stdout") == b""


# No example database: the guest's checkout is read-only, and a fallback warning is an error there.
@settings(max_examples=300, deadline=None, database=None)
@given(
    before=st.binary(max_size=40),
    after=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=6),
)
def test_however_the_output_is_cut_no_whole_value_gets_through(
    before: bytes, after: bytes, cuts: list[int]
) -> None:
    """Whatever surrounds the value and wherever the writes split it, the reader never sees it whole,
    and what it sees is the text with each value as ***."""
    text = before + SECRET.encode() + after
    points = sorted({min(cut, len(text)) for cut in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    seen = masked(Masker([SECRET]), pieces)
    assert SECRET.encode() not in seen
    assert seen == text.replace(SECRET.encode(), b"***")
