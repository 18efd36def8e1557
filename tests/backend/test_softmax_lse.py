"""The C backend's softmax (NumPy's, over row blocks on threads) and topk.chosen: the same bits
as the reference steps they stand in for."""
import numpy as np
import pytest

from props import given, settings, st
from pymoe.backend import c_softmax as row_blocks
from pymoe.router import softmax, softmax_lse
from pymoe.topk import chosen


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 300), E=st.sampled_from([1, 2, 3, 5, 8, 17, 64, 257]),
       dtype=st.sampled_from([np.float32, np.float64]), threads=st.integers(1, 5),
       block=st.sampled_from([1, 7, 64, 1 << 16]), seed=st.integers(0, 2**31))
def test_threaded_softmax_is_the_reference_bit_for_bit(T, E, dtype, threads, block, seed):
    logits = np.random.default_rng(seed).normal(scale=4, size=(T, E)).astype(dtype)
    want = softmax_lse(logits.copy())
    with pytest.MonkeyPatch.context() as mp:  # small blocks and rows per thread: many of each
        mp.setattr(row_blocks, "BLOCK_ELEMENTS", block)
        mp.setattr(row_blocks, "MIN_ROWS_PER_THREAD", 8)
        got = row_blocks.softmax_lse_threads(logits, threads)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()
    np.testing.assert_array_equal(got[0], softmax(logits))


def test_c_backend_softmax_matches_at_every_thread_count(c_backend):
    logits = np.random.default_rng(0).normal(size=(5000, 64)).astype(np.float32)
    want = softmax_lse(logits)
    for n in (1, 2, 3):
        with c_backend.num_threads(n):
            got = c_backend.softmax_lse(logits)
        assert all(g.tobytes() == w.tobytes() for g, w in zip(got, want)), n


def test_c_backend_softmax_checks_its_argument(c_backend):
    with pytest.raises(ValueError, match="router_logits"):
        c_backend.softmax_lse(np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="router_logits"):
        c_backend.softmax_lse(np.zeros((2, 3), np.float16))


@given(T=st.integers(0, 50), E=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_chosen_is_take_along_axis(T, E, seed):
    rng = np.random.default_rng(seed)
    probs = rng.random((T, E))
    index = np.argsort(rng.random((T, E)), axis=1)[:, :max(1, E // 3)]
    np.testing.assert_array_equal(chosen(probs, index), np.take_along_axis(probs, index, axis=1))


def test_threaded_softmax_checks_its_arguments():
    with pytest.raises(ValueError, match="router_logits"):
        row_blocks.softmax_lse_threads(np.zeros(4), 2)
    with pytest.raises(TypeError, match="router_logits"):
        row_blocks.softmax_lse_threads("logits", 2)
    with pytest.raises(ValueError, match="threads"):
        row_blocks.softmax_lse_threads(np.zeros((2, 3)), 0)
