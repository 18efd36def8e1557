"""The CPU emulation is strict enough for the kernel tests to mean something."""
import os
import shutil
import subprocess

import numpy as np
import pytest

import pymoe
from conftest import REPO, cuda_build_module
from pymoe import cuda_backend
from pymoe.numpy_backend import NumpyBackend


def test_emulator_selftest(tmp_path):
    """Barriers synchronise; a barrier without barrier support, a divergent barrier and an
    oversized block all fail the launch (csrc/cuda/emu/selftest.cpp)."""
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        pytest.skip(f"{cxx} not found")
    exe = tmp_path / "selftest"
    subprocess.run([cxx, "-std=c++20", "-Wall", "-Wextra", "-Werror", "-DPYMOE_EMULATE",
                    os.path.join(REPO, "csrc", "cuda", "emu", "selftest.cpp"), "-o", str(exe)],
                   check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout
    assert "self-test passed" in res.stdout


def test_kernel_tests_catch_a_missing_barrier(tmp_path):
    """Built with __syncthreads as a no-op, the barrier kernels give wrong answers that the
    comparisons with the reference reject; honouring the barrier is what makes them right."""
    path = str(tmp_path / "noop_barrier.so")
    cuda_build_module().build(path, emulate=True, noop_barrier=True)
    be, info = cuda_backend.load(path)
    assert be is not None, info.detail
    rng = np.random.default_rng(0)
    T, E, K, D = 48, 4, 2, 64
    logits = rng.normal(size=(T, E))
    r = pymoe.route(logits, K, 0.75)
    x = rng.normal(size=(T, D))
    ein = NumpyBackend().dispatch(x, r.slot_owner, K)
    with be.block_size(64):
        g = be.gate_grad(x, ein, r.expert_index, r.position)
        position, _, _ = be.assign_slots(r.expert_index, None, E, r.capacity)
    ref = NumpyBackend().gate_grad(x, ein, r.expert_index, r.position)
    assert not np.allclose(g, ref), "gate_grad came out right without its barriers"
    assert not np.array_equal(position, r.position), "slots came out right without barriers"
