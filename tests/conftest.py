"""Shared pytest setup: hypothesis profiles, fixtures and the gpu marker (helpers live in helpers.py)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from helpers import cuda_build_module, gpu_visible

try:
    from hypothesis import HealthCheck, settings

    # CI runs a fixed, derandomised set of examples so a run is reproducible; locally, set
    # HYPOTHESIS_PROFILE=dev for more (and random) examples, "compat" for a quick check that
    # everything runs (every CI run, on each Python, uses "ci").
    settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("compat", max_examples=20, deadline=None, derandomize=True,
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
    from pymoe.backend import c_backend as cb

    be, info = cb.load()
    if be is None:
        if os.environ.get("PYMOE_REQUIRE_C") == "1":
            pytest.fail(f"PYMOE_REQUIRE_C=1 but the C backend is unavailable: {info.detail}")
        pytest.skip(f"C backend unavailable: {info.detail}")
    return be


@pytest.fixture(scope="session")
def c_core():
    """[the C backend] when it is built, else []: the CUDA kernels must match its bits."""
    from pymoe.backend import c_backend

    be, _ = c_backend.load()
    return [be] if be is not None else []


# ------------------------------------------------------------------------------- CUDA
def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    visible, why = gpu_visible()
    config._pymoe_gpu_note = f"{len(gpu)} gpu tests {'selected' if visible else 'deselected'}: {why}"
    if not visible:
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    note = getattr(config, "_pymoe_gpu_note", None)
    if note:
        terminalreporter.write_line(note)
    fuzz = sys.modules.get("fuzz")  # tests/fuzz.py: how many cases the fuzz tests ran, by outcome
    if fuzz is not None and fuzz.STATS:
        terminalreporter.write_line(fuzz.summary())


@pytest.fixture(scope="session")
def cuda_emulator_path(tmp_path_factory) -> str:
    """The CPU emulation of the CUDA library, built from csrc/cuda by g++ for this test run."""
    out = str(tmp_path_factory.mktemp("cuda_emu") / "pymoe_cuda_emu.so")
    cuda_build_module().build(out, emulate=True)
    return out


class CudaImpl:
    """A CUDA backend plus how to move NumPy arrays to and from its memory."""

    def __init__(self, backend, to_device, to_host, label):
        self.backend, self.to_device, self.to_host, self.label = backend, to_device, to_host, label


@pytest.fixture(scope="session", params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def cuda_impl(request, tmp_path_factory) -> CudaImpl:
    """The CUDA kernels: run by the CPU emulator, or (marked gpu) on a real device."""
    from pymoe.backend import cuda_backend

    if request.param == "emulated":
        be, info = cuda_backend.load(request.getfixturevalue("cuda_emulator_path"))
        assert be is not None and be.emulated, info.detail
        return CudaImpl(be, np.ascontiguousarray, np.asarray, "emulated")
    import cupy

    path = cuda_backend.library_path()
    if not os.path.exists(path):
        path = str(tmp_path_factory.mktemp("cuda") / "pymoe_cuda.so")
        cuda_build_module().build(path)
    be, info = cuda_backend.load(path)
    assert be is not None and not be.emulated, info.detail
    return CudaImpl(be, cupy.asarray, cupy.asnumpy, "gpu")
