"""The CPU emulation is strict enough for the kernel tests to mean something."""
import os
import shutil
import subprocess

import numpy as np
import pytest

import pymoe
from helpers import REPO, cuda_build_module
from pymoe.backend import cuda_backend
from pymoe.backend.numpy_backend import NumpyBackend
from pymoe.slots import assign


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    """csrc/cuda/emu/selftest.cpp, compiled with warnings as errors."""
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        pytest.skip(f"{cxx} not found")
    exe = tmp_path_factory.mktemp("selftest") / "selftest"
    subprocess.run([cxx, "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-DPYMOE_EMULATE",
                    os.path.join(REPO, "csrc", "cuda", "emu", "selftest.cpp"), "-o", str(exe)],
                   check=True)
    return str(exe)


def run_case(selftest: str, case: str) -> str:
    res = subprocess.run([selftest, case], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout
    assert res.stdout.startswith(f"ok {case}: "), res.stdout
    return res.stdout


@pytest.mark.parametrize("case", ["barrier", "warp_primitives", "syncwarp_present",
                                  "right_shuffle_mask", "barrier_orders_shared"])
def test_right_kernels_run_right(selftest, case):
    """Barriers synchronise the block; shuffles, ballot and match_any return what the CUDA guide
    says; a warp reduction through shared memory with __syncwarp, a half-warp reduction with a
    half-warp mask and width, and neighbours exchanging through shared memory after a barrier
    all run without a report and give the right values."""
    run_case(selftest, case)


@pytest.mark.parametrize("case,caught", [
    # (the emulator's negative tests: each planted bug must fail the launch, naming it)
    ("barrier_in_loop_mode", "without barrier support"),
    ("divergent_barrier", "divergent __syncthreads"),
    ("missing_syncwarp", "shared-memory race on s["),
    ("wrong_shuffle_mask", "reads lane 16, which is not in the mask"),
    ("mask_names_absent_lanes", "waits for lane 16, which has finished"),
    ("mask_without_caller", "called by lane 0, which is not in it"),
    ("shared_race", "shared-memory race on s["),
    ("shared_out_of_bounds", "out of bounds [0, 32) in s"),
    ("other_device_memory", "atomicOr on memory of device 0 by a kernel running on device 1"),
])
def test_planted_bugs_are_caught(selftest, case, caught):
    """A missing __syncwarp (a pre-Volta warp-synchronous reduction), a wrong shuffle mask (a
    half-warp sum reading lanes outside its mask; a full mask in a branch half the warp skips;
    a mask without the caller), a planted shared-memory race (neighbour exchange without a
    barrier), a barrier where it is not allowed, an out-of-bounds shared index, and a write to
    another device's memory."""
    assert caught in run_case(selftest, case)


def test_thread_order_is_random_and_seeded(selftest):
    """Threads do not run in ascending order (code right only in that order fails), and the
    seed makes the order reproducible; the oversized block is refused at launch."""
    run_case(selftest, "random_order")
    run_case(selftest, "oversized_block")


def test_kernel_tests_catch_a_missing_barrier(tmp_path):
    """Built with __syncthreads and __syncwarp as no-ops, every kernel that has barriers fails:
    the shared-memory race check reports the accesses the barriers ordered (or, where a race
    slips through, the comparison with the reference rejects the result)."""
    path = str(tmp_path / "noop_barrier.so")
    cuda_build_module().build(path, emulate=True, noop_barrier=True)
    be, info = cuda_backend.load(path)
    assert be is not None, info.detail
    rng = np.random.default_rng(0)
    T, E, K, D = 300, 4, 2, 64
    logits = rng.normal(size=(T, E))
    r = pymoe.route(logits, K, 0.75)
    x = rng.normal(size=(T, D))
    ref = NumpyBackend()
    ein = ref.dispatch(x, r.slot_owner, K)
    calls = {
        "assign_slots": (lambda: be.assign_slots(r.expert_index, None, E, r.capacity)[0],
                         r.position),
        "keep_by_score": (lambda: be.keep_by_score(r.expert_index, np.arange(T * K), r.gate_before_drop,
                                                   E, r.capacity), None),
        "combine": (lambda: be.combine(ein, r.expert_index, r.position),
                    ref.combine(ein, r.expert_index, r.position)),
        "gate_grad": (lambda: be.gate_grad(x, ein, r.expert_index, r.position),
                      ref.gate_grad(x, ein, r.expert_index, r.position)),
    }
    for name, (call, want) in calls.items():
        with be.block_size(64):
            try:
                got = call()
            except RuntimeError as err:
                assert "shared-memory race" in str(err), (name, err)
                continue
        assert want is not None and not np.allclose(got, want), f"{name} ran right without barriers"


def test_results_do_not_depend_on_the_thread_order(cuda_emulator_path, monkeypatch):
    """The same launches under three thread-order seeds: the same integers and the same bits
    (a kernel whose result depended on the order its threads happen to run in would differ)."""
    be, info = cuda_backend.load(cuda_emulator_path)
    assert be is not None, info.detail
    rng = np.random.default_rng(2)
    T, E, K, D = 200, 7, 2, 20
    logits = np.round(rng.normal(size=(T, E)), 1)
    r = pymoe.route(logits, K, 0.9, priority="score")
    x = rng.normal(size=(T, D))
    results = []
    for seed in ("1", "2", "3"):
        monkeypatch.setenv("PYMOE_EMU_SEED", seed)
        with be.block_size(64):
            _, index, gate = be.softmax_top_k(logits, K)
            slots = assign(be, index, r.token_order, E, r.capacity, priority="score",
                           drop_policy="probs", score=gate)
            ein = be.dispatch(x, slots[1], K, gate)
            g = be.gate_grad(x, ein, index, slots[0])
        results.append([index, gate, *slots, ein, g])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
