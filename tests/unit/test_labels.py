"""The label rules: count, name alphabet and length, value length and characters, name=value parts."""

from __future__ import annotations

import pytest

from warmpod.errors import InvalidLabel, InvalidRun
from warmpod.labels import MAX_LABELS, MAX_NAME, MAX_VALUE, checked_labels, label_pairs


def test_labels_within_the_rules_are_kept_sorted_by_name() -> None:
    """Names of the plain alphabet at both length bounds and values up to the bound (empty,
    spaces, non-ASCII printable) pass, sorted by name."""
    labels = {"z": "", "a" * MAX_NAME: "x" * MAX_VALUE, "0.team_a-b": "Café report 11/03"}
    assert checked_labels(labels) == tuple(sorted(labels.items()))
    assert len(checked_labels({f"k{i}": "v" for i in range(MAX_LABELS)})) == MAX_LABELS


@pytest.mark.parametrize(
    ("labels", "rule"),
    [
        ({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, "at most 16"),
        ({"": "v"}, "1-63"),
        ({"a" * (MAX_NAME + 1): "v"}, "1-63"),
        ({"Team": "v"}, "a-z"),
        ({"_team": "v"}, "starting with"),
        ({"te am": "v"}, "a-z"),
        ({"té": "v"}, "a-z"),
        ({"t": "x" * (MAX_VALUE + 1)}, "at most 256"),
        ({"t": "a\tb"}, "printable"),
        ({"t": "\x1b[31m"}, "printable"),
        ({"t": "a\u2028b"}, "printable"),
    ],
)
def test_a_label_that_breaks_a_rule_is_refused_naming_it(labels: dict[str, str], rule: str) -> None:
    """Each rule broken raises InvalidLabel (a 422, as every InvalidRun) whose message names it."""
    with pytest.raises(InvalidLabel, match=rule) as raised:
        checked_labels(labels)
    assert isinstance(raised.value, InvalidRun)


def test_name_value_parts_split_at_the_first_equals_and_name_each_label_once() -> None:
    """A part splits at its first '='; one without '=' or a name given twice is refused."""
    assert label_pairs(["a=b=c", "d="], "label") == {"a": "b=c", "d": ""}
    with pytest.raises(InvalidLabel, match="name=value"):
        label_pairs(["ab"], "label")
    with pytest.raises(InvalidLabel, match="twice"):
        label_pairs(["a=1", "a=2"], "label")
