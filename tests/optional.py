"""Optional test dependencies: skip with the reason where a package is missing, fail under
PYMOE_REQUIRE_OPTIONAL=1 (CI sets it, so a missing or broken optional package cannot pass as
'skipped')."""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import pytest

REQUIRE_ENV = "PYMOE_REQUIRE_OPTIONAL"


def required() -> bool:
    """True when every optional test dependency must be present (CI)."""
    return os.environ.get(REQUIRE_ENV) == "1"


def require(available: bool, why: str, *, module_level: bool = False) -> None:
    """Nothing when `available`; else skip with `why`, or fail under PYMOE_REQUIRE_OPTIONAL=1
    (for checks that are not one import, such as an MPI library and its mpiexec)."""
    if available:
        return
    if required():
        pytest.fail(f"{REQUIRE_ENV}=1 but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=module_level)


def import_optional(name: str, extra: str, *, module_level: bool = True) -> ModuleType:
    """Import `name`, or skip the calling test module (or test) with the reason.

    extra: the pymoe extra that installs it (named in the skip message). Import warnings (the
    systems' own CPU-only notices) are silenced.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception as err:  # ImportError, or a package that is installed but broken
        require(False, f"{name} unavailable ({type(err).__name__}: {err}); pip install "
                f"'pymoe[{extra}]'", module_level=module_level)
