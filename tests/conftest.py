"""Shared pytest setup: hypothesis profiles and small helpers."""
from __future__ import annotations

import os

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings

    # CI runs a fixed, derandomised set of examples so a run is reproducible; locally, set
    # HYPOTHESIS_PROFILE=dev for more (and random) examples.
    settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=300, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the test extra; the property tests skip without it
    pass


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def c_backend():
    """The C backend; a skip (with the reason) where it is not built, a failure under
    PYMOE_REQUIRE_C=1, which CI sets so that a broken C build cannot pass as 'skipped'."""
    from pymoe import c_backend as cb

    be, info = cb.load()
    if be is None:
        if os.environ.get("PYMOE_REQUIRE_C") == "1":
            pytest.fail(f"PYMOE_REQUIRE_C=1 but the C backend is unavailable: {info.detail}")
        pytest.skip(f"C backend unavailable: {info.detail}")
    return be

