"""Run labels: the rules a run's ``labels`` must keep, checked once when it is submitted."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from warmpod.errors import InvalidLabel

MAX_LABELS = 16
"""The most labels one run may carry."""
MAX_NAME = 63
"""The longest label name, in characters."""
MAX_VALUE = 256
"""The longest label value, in characters."""
_NAME = re.compile(rf"[a-z0-9][a-z0-9_.-]{{0,{MAX_NAME - 1}}}")

Labels = tuple[tuple[str, str], ...]
"""A run's labels as kept with it: ``(name, value)`` pairs, sorted by name."""


def checked_labels(labels: Mapping[str, str]) -> Labels:
    """``labels`` sorted by name, once each keeps the rules.

    Raises:
        InvalidLabel: more than ``MAX_LABELS``, a name that is not 1-63 of ``a-z 0-9 _ . -``
            starting with a letter or digit, or a value over ``MAX_VALUE`` characters or with a
            character that is not printable; the message names the rule.
    """
    if len(labels) > MAX_LABELS:
        raise InvalidLabel(f"a run may carry at most {MAX_LABELS} labels, not {len(labels)}")
    for name, value in labels.items():
        check_pair(name, value)
    return tuple(sorted(labels.items()))


def check_pair(name: str, value: str) -> None:
    """Check one label (as ``checked_labels`` does each); a filter's label is held to the same rules.

    Raises:
        InvalidLabel: the name or the value breaks a rule.
    """
    if not _NAME.fullmatch(name):
        raise InvalidLabel(
            f"label name {name[:80]!r} is not allowed: names are 1-{MAX_NAME} characters of a-z, 0-9, "
            "'_', '.' and '-', starting with a letter or a digit"
        )
    if len(value) > MAX_VALUE:
        raise InvalidLabel(f"label {name!r} has a value of {len(value)} characters: at most {MAX_VALUE}")
    if not value.isprintable():
        raise InvalidLabel(
            f"label {name!r} has a value with a character that is not printable (a control character, "
            "a line break or a tab): values are printable text"
        )


def label_pairs(parts: Iterable[str], field: str) -> dict[str, str]:
    """Labels given as ``name=value`` texts (a form's repeated field, a query's), each name once.

    Raises:
        InvalidLabel: a part without ``=``, or a name given twice.
    """
    labels: dict[str, str] = {}
    for part in parts:
        name, equals, value = part.partition("=")
        if not equals:
            raise InvalidLabel(f"{field} must be name=value, not {part[:80]!r}")
        if name in labels:
            raise InvalidLabel(f"{field} gives the label {name[:80]!r} twice")
        labels[name] = value
    return labels
