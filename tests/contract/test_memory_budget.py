"""The memory budget: what it refuses and says, and intermediates no wider than needed
(regressions: each test failed before its fix)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import pymoe
from pymoe import get_backend
from pymoe.dense import dense_tensors
from pymoe.priority import position_in_expert


# ------------------------------------------------------------------ memory
def test_memory_budget_names_the_size_and_the_cheaper_path():
    with pytest.raises(pymoe.MemoryBudgetError,
                       match=r"capacity: slot_owner \[E, C\] = \[4, 1000000000\].* GiB.*"
                             r"capacity=min\(capacity, T\)"):
        get_backend("numpy").assign_slots(np.zeros((3, 1), int), None, 4, 10**9)
    logits = np.zeros((256, 64))
    with pymoe.memory_budget(None):
        r = pymoe.route(logits, 2)
    with pymoe.memory_budget(100_000):
        with pytest.raises(pymoe.MemoryBudgetError,
                           match=r"expert_index: .*\[T, K, E\] = \[256, 2, 64\].*backend='c'"):
            pymoe.route(logits, 2)
        with pytest.raises(pymoe.MemoryBudgetError,
                           match=r"dispatch_mask: .*\[T, E, C\] = \[256, 64, 10\].*"
                                 r"formulation='indexed'"):
            _ = r.dispatch_mask
        assert pymoe.route(logits[:8], 2).dispatch_mask.shape == (8, 64, 1)  # small enough
    assert pymoe.get_memory_budget() == pymoe.memory.DEFAULT_BUDGET
    assert isinstance(pymoe.MemoryBudgetError("x"), ValueError)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_dense_intermediates_are_no_wider_than_needed():
    T, K, E = 4096, 2, 64
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(T)])
    # one bool one-hot and its permuted copies plus an int32 count: about 6-7 bytes per entry
    # (it was 29: an int64 one-hot and an int64 cumsum, each copied)
    assert _peak_bytes(lambda: position_in_expert(idx, E, np.arange(T))) < 8 * T * K * E
    C = 2 * T * K // E
    pos = position_in_expert(idx, E, np.arange(T))
    pos = np.where(pos < C, pos, -1)
    gate = np.ones((T, K), np.float32)
    # a bool mask and float32 weights: 5 bytes per [T, E, C] entry (it was 8 + 1 + 4 + 8)
    assert _peak_bytes(lambda: dense_tensors(idx, pos, gate, E, C)) < 6 * T * E * C
