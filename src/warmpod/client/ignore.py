"""``.warmpodignore``: gitignore's common rules, for the files of a project directory a run leaves out.

The subset: blank lines and ``#`` comments; ``*`` and ``?`` within one path component and ``[...]``
classes (``fnmatch``'s); ``**`` as a whole component for any number of directories; a trailing ``/``
for directories only; a ``/`` at the start or in the middle to anchor a pattern at the directory's
root (else it matches at any depth); ``!`` to take back what an earlier rule left out; ``\\`` to
escape the next character. The last rule that matches decides; a directory left out is not entered,
so nothing under it can be taken back (as in git).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

IGNORE_FILE = ".warmpodignore"
"""The rules' file, at the root of the project directory."""
DEFAULT_RULES = (".git/", "__pycache__/", ".venv/", "/out/", f"/{IGNORE_FILE}")
"""Left out before the file's own rules (which may take them back with ``!``): version control,
bytecode and virtual environments are no use in a sandbox, out/ is where a run leaves its files
(the server refuses input files there), and the rules are the client's, not the program's."""
_ANY = "**"


@dataclass(frozen=True)
class Rule:
    """One pattern line: the path components it matches, and how."""

    parts: tuple[str, ...]
    """``fnmatch`` patterns of successive path components; ``**`` stands for any number of them."""
    negated: bool = False
    """A ``!`` rule: what it matches is sent after all."""
    directory_only: bool = False
    """A pattern with a trailing ``/``: it matches directories, never files."""

    def matches(self, parts: Sequence[str], is_dir: bool) -> bool:
        """Whether this rule's pattern matches the path of ``parts`` (a directory's when ``is_dir``)."""
        if self.directory_only and not is_dir:
            return False
        return _match(self.parts, tuple(parts))


def parse_rule(line: str) -> Rule | None:
    """The rule of one line of an ignore file, or None for a blank line or a comment."""
    line = _without_trailing_spaces(line.rstrip("\r\n"))
    if not line or line.startswith("#"):
        return None
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    directory_only = line.endswith("/")
    line = line.rstrip("/")
    # A slash before the last component anchors the pattern at the root; a name alone may be anywhere.
    anchored = "/" in line
    parts = tuple(_escaped(part) for part in line.split("/") if part)
    if not parts:
        return None
    if not anchored:
        parts = (_ANY, *parts)
    return Rule(parts=parts, negated=negated, directory_only=directory_only)


class IgnoreRules:
    """An ignore file's rules after the defaults: what of a project directory a run leaves out."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def parse(cls, text: str, *, defaults: Sequence[str] = DEFAULT_RULES) -> IgnoreRules:
        """The rules of ``defaults`` then of the ignore file's ``text``, one pattern a line."""
        lines = [*defaults, *text.splitlines()]
        return cls(rule for rule in map(parse_rule, lines) if rule is not None)

    def ignored(self, path: str, is_dir: bool = False) -> bool:
        """Whether the relative POSIX ``path`` is left out: by its last matching rule, or because a
        directory above it is."""
        parts = path.split("/")
        above = any(self._decides(parts[:depth], True) for depth in range(1, len(parts)))
        return above or self._decides(parts, is_dir)

    def _decides(self, parts: Sequence[str], is_dir: bool) -> bool:
        for rule in reversed(self.rules):
            if rule.matches(parts, is_dir):
                return not rule.negated
        return False


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == _ANY:
        if not rest:
            # A trailing /** matches what is inside a directory, not the directory itself.
            return bool(parts)
        return any(_match(rest, parts[skip:]) for skip in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and _match(rest, parts[1:])


def _without_trailing_spaces(line: str) -> str:
    # As git: trailing spaces go unless the last one is escaped with a backslash.
    while line.endswith(" ") and not line.endswith("\\ "):
        line = line[:-1]
    return line


def _escaped(part: str) -> str:
    """``part`` with each backslash-escaped character made literal for ``fnmatch`` (``[c]``)."""
    if "\\" not in part:
        return part
    out = []
    chars = iter(part)
    for char in chars:
        if char == "\\":
            char = next(chars, "\\")
            out.append(f"[{char}]" if char in "*?[" else char)
        else:
            out.append(char)
    return "".join(out)
