"""What a run may add to its program's environment: plain names, and none that warmpod sets itself."""

from __future__ import annotations

import re

MAX_ENV_NAME = 128
"""Characters of a variable's name at most."""
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What the agent sets for every program (pool/agent.py, spawn_interpreter), what changes how the
# interpreter or the dynamic loader behave, and warmpod's own namespace.
_RESERVED_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TMPDIR",
        "MPLCONFIGDIR",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "BLIS_NUM_THREADS",
        "JE_ARROW_MALLOC_CONF",
        "MALLOC_CONF",
        "GCONV_PATH",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "RES_OPTIONS",
        "TZDIR",
        "NLSPATH",
    }
)
_RESERVED_PREFIXES = ("PYTHON", "LD_", "LC_", "WARMPOD", "MALLOC_", "GLIBC_")


def name_problem(name: str) -> str | None:
    """Which rule the variable name ``name`` breaks, or None."""
    if len(name) > MAX_ENV_NAME:
        return f"is longer than {MAX_ENV_NAME} characters"
    if not NAME.fullmatch(name):
        return "is not a plain name (letters, digits and '_', not starting with a digit)"
    if name in _RESERVED_NAMES or name.startswith(_RESERVED_PREFIXES):
        return "is reserved: warmpod sets it, or it changes how the interpreter or the loader behave"
    return None
