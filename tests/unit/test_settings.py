"""Unit tests of settings: defaults, parsing of WARMPOD_SECTION__FIELD variables, and their errors."""

from __future__ import annotations

import pytest

from warmpod.errors import SettingsError
from warmpod.settings import Settings, from_env


def test_defaults_without_any_variable() -> None:
    """An empty environment gives the documented defaults."""
    settings = from_env({})
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert settings.pool.size is None
    assert settings.pool.bounds == (4, 16)
    assert settings.pool.preload == ("numpy", "pandas")
    assert settings.pool.pause is True
    assert settings.limits.timeout == 10.0
    assert settings.limits.max_timeout == 60.0
    assert settings.limits.max_output_bytes == 1024 * 1024
    assert settings.engine.url == ""


def test_pool_size_from_environment() -> None:
    """WARMPOD_POOL__SIZE=7 sets pool.size to the integer 7, which stands for the minimum size."""
    settings = from_env({"WARMPOD_POOL__SIZE": "7"})
    assert settings.pool.size == 7
    assert type(settings.pool.size) is int
    assert settings.pool.bounds == (7, 16)
    assert from_env({"WARMPOD_POOL__SIZE": "20"}).pool.bounds == (20, 20)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("numpy,pandas", ("numpy", "pandas")),
        (" numpy , scipy.stats ,", ("numpy", "scipy.stats")),
        ('["numpy", "os.path"]', ("numpy", "os.path")),
        ("", ()),
    ],
)
def test_preload_from_environment(value: str, expected: tuple[str, ...]) -> None:
    """WARMPOD_POOL__PRELOAD takes a comma-separated or JSON list of modules; empty disables it."""
    assert from_env({"WARMPOD_POOL__PRELOAD": value}).pool.preload == expected


@pytest.mark.parametrize("value", ["os;rm -rf /", "numpy,../x", '["numpy"', "[1]", "-c"])
def test_preload_rejects_what_is_not_a_module_name(value: str) -> None:
    """A preload entry that is not a dotted module name is refused, naming the variable."""
    with pytest.raises(SettingsError, match="WARMPOD_POOL__PRELOAD"):
        from_env({"WARMPOD_POOL__PRELOAD": value})


def test_min_size_above_max_size_is_refused() -> None:
    """A minimum pool size above the maximum is refused, naming both variables."""
    with pytest.raises(SettingsError, match=r"WARMPOD_POOL__MIN_SIZE.*WARMPOD_POOL__MAX_SIZE"):
        from_env({"WARMPOD_POOL__MIN_SIZE": "8", "WARMPOD_POOL__MAX_SIZE": "4"})


@pytest.mark.parametrize(
    ("variable", "value", "path", "expected"),
    [
        ("WARMPOD_SERVER__PORT", "9001", ("server", "port"), 9001),
        ("WARMPOD_SERVER__HOST", "0.0.0.0", ("server", "host"), "0.0.0.0"),
        ("WARMPOD_LIMITS__TIMEOUT", "2.5", ("limits", "timeout"), 2.5),
        ("WARMPOD_LIMITS__CPUS", "0.5", ("limits", "cpus"), 0.5),
        ("WARMPOD_POOL__PAUSE", "false", ("pool", "pause"), False),
        ("WARMPOD_POOL__PAUSE", "0", ("pool", "pause"), False),
        ("WARMPOD_POOL__PAUSE", "true", ("pool", "pause"), True),
        (
            "WARMPOD_ENGINE__URL",
            "unix:///run/podman/podman.sock",
            ("engine", "url"),
            "unix:///run/podman/podman.sock",
        ),
    ],
)
def test_variables_are_converted_to_field_types(
    variable: str, value: str, path: tuple[str, str], expected: object
) -> None:
    """Each variable's string is converted to its field's type (int, float, bool, str)."""
    settings = from_env({variable: value})
    section, field = path
    assert getattr(getattr(settings, section), field) == expected


def test_reads_os_environ_when_no_mapping_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, from_env reads the process environment at call time."""
    monkeypatch.setenv("WARMPOD_POOL__SIZE", "5")
    assert from_env().pool.size == 5


def test_unrelated_variables_are_ignored() -> None:
    """Variables without the upper-case WARMPOD_ prefix or a SECTION__FIELD shape do not matter."""
    environ = {"PATH": "/bin", "POOL__SIZE": "9", "WARMPOD_DEBUG": "1", "warmpod_pool__size": "9"}
    settings = from_env(environ)
    assert settings == Settings()


def test_overrides_win_over_the_environment() -> None:
    """Keyword overrides are applied after the environment."""
    settings = from_env({"WARMPOD_POOL__SIZE": "7"}, pool={"size": 2})
    assert settings.pool.size == 2


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after they are built."""
    settings = from_env({})
    with pytest.raises(AttributeError):
        settings.pool.size = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WARMPOD_POOL__SIZE", "seven"),
        ("WARMPOD_POOL__SIZE", "0"),
        ("WARMPOD_SERVER__PORT", "65536"),
        ("WARMPOD_LIMITS__TIMEOUT", "-1"),
        ("WARMPOD_POOL__PAUSE", "maybe"),
    ],
)
def test_wrong_values_name_the_variable(variable: str, value: str) -> None:
    """A value of the wrong type or out of range raises SettingsError naming the variable to fix."""
    with pytest.raises(SettingsError) as caught:
        from_env({variable: value})
    assert variable in str(caught.value)


@pytest.mark.parametrize(
    "variable",
    ["WARMPOD_POOL__SIZZE", "WARMPOD_POLL__SIZE"],
)
def test_unknown_settings_name_the_variable(variable: str) -> None:
    """A misspelt section or field raises SettingsError naming the variable to fix."""
    with pytest.raises(SettingsError) as caught:
        from_env({variable: "1"})
    assert variable in str(caught.value)


def test_timeout_above_max_timeout_is_rejected() -> None:
    """A default timeout larger than the maximum a request may ask for is inconsistent."""
    with pytest.raises(SettingsError, match="max_timeout"):
        from_env({"WARMPOD_LIMITS__TIMEOUT": "90"})


def test_timeout_equal_to_max_timeout_is_accepted() -> None:
    """A default timeout equal to the maximum is allowed."""
    settings = from_env({"WARMPOD_LIMITS__TIMEOUT": "30", "WARMPOD_LIMITS__MAX_TIMEOUT": "30"})
    assert settings.limits.timeout == settings.limits.max_timeout == 30.0
