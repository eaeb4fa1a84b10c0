"""Unit tests of a run's program rules: the entrypoint, args, env, secret and source names."""

from __future__ import annotations

import pytest

from warmpod.errors import InvalidFile, InvalidProgram
from warmpod.sandbox import program


def test_the_entrypoint_defaults_to_main_py_for_code() -> None:
    """Code with no entrypoint runs as main.py."""
    assert program.check_entrypoint(None, True, ["data.csv"]) == "main.py"


def test_an_entrypoint_without_code_must_be_one_of_the_files() -> None:
    """Without code the entrypoint is a file sent; with code it may not be one (code is written there)."""
    assert program.check_entrypoint("report/run.py", False, ["report/run.py"]) == "report/run.py"
    with pytest.raises(InvalidProgram, match="not among the files"):
        program.check_entrypoint("report/run.py", False, [])
    with pytest.raises(InvalidFile, match="reserved"):
        program.check_entrypoint("main.py", True, ["main.py"])


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("9LIVES", "plain name"),
        ("A-B", "plain name"),
        ("", "plain name"),
        ("X" * 129, "longer than 128"),
        ("PATH", "reserved"),
        ("HOME", "reserved"),
        ("PYTHONSTARTUP", "reserved"),
        ("LD_LIBRARY_PATH", "reserved"),
        ("LC_ALL", "reserved"),
        ("WARMPOD_TOKEN", "reserved"),
        ("OPENBLAS_NUM_THREADS", "reserved"),
    ],
)
def test_a_bad_or_reserved_variable_name_is_refused_naming_the_rule(name: str, rule: str) -> None:
    """Each name rule, broken in env or in secrets, is an InvalidProgram naming it and the name."""
    with pytest.raises(InvalidProgram, match=rule):
        program.check_env({name: "v"}, [])
    with pytest.raises(InvalidProgram, match=rule):
        program.check_env({}, [name])


def test_plain_names_and_text_values_pass() -> None:
    """Ordinary variables and arguments, unicode included, are kept as given and in order."""
    assert program.check_env({"REGION": "Zürich", "_X1": ""}, ["WAREHOUSE_DSN"]) == (
        ("REGION", "Zürich"),
        ("_X1", ""),
    )
    assert program.check_args(["--from", "2026-11", "naïve"]) == ("--from", "2026-11", "naïve")


def test_sizes_and_counts_have_maxima() -> None:
    """Too many args or variables, a too long one, or too many bytes together are refused."""
    with pytest.raises(InvalidProgram, match="at most 256"):
        program.check_args(["a"] * 257)
    with pytest.raises(InvalidProgram, match=r"args\[0\]"):
        program.check_args(["a" * (program.MAX_ARG_BYTES + 1)])
    with pytest.raises(InvalidProgram, match="NUL"):
        program.check_args(["a\0b"])
    with pytest.raises(InvalidProgram, match="at most 64 together"):
        program.check_env({f"V{i}": "" for i in range(60)}, [f"S{i}" for i in range(5)])
    with pytest.raises(InvalidProgram, match="together"):
        program.check_sizes(["a" * 16000] * 17, [])


def test_a_secret_named_twice_or_also_in_env_is_refused() -> None:
    """A variable comes from env or from a secret, once."""
    with pytest.raises(InvalidProgram, match="also in env"):
        program.check_env({"DSN": "x"}, ["DSN"])
    with pytest.raises(InvalidProgram, match="twice"):
        program.check_env({}, ["DSN", "DSN"])


@pytest.mark.parametrize("name", ["Warehouse", "1db", "db-1", "", "a" * 33, "crm api", "ünï"])
def test_a_malformed_source_name_is_refused_naming_it(name: str) -> None:
    """A source's name is 1-32 lowercase letters, digits or '_', starting with a letter."""
    with pytest.raises(InvalidProgram, match="source name") as caught:
        program.check_sources([name])
    assert repr(name[:64]) in str(caught.value)


def test_sources_are_kept_in_order_once_each_and_at_most_so_many() -> None:
    """Well-formed names pass in order; one named twice or too many are refused."""
    assert program.check_sources(["warehouse", "crm_2"]) == ("warehouse", "crm_2")
    assert program.check_sources(["a" * 32]) == ("a" * 32,)
    with pytest.raises(InvalidProgram, match="twice"):
        program.check_sources(["warehouse", "warehouse"])
    with pytest.raises(InvalidProgram, match=f"at most {program.MAX_SOURCES}"):
        program.check_sources([f"s{i}" for i in range(program.MAX_SOURCES + 1)])
