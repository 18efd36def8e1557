"""The C backend's out= buffers may not overlap an input, and its thread count is bounded and
process-wide (regressions: each test failed before its fix)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from pymoe import get_backend


# ------------------------------------------------------------------ out= aliasing
def test_out_overlapping_an_input_is_an_error(c_backend):
    T, D, E, C, K = 4, 3, 2, 2, 1
    x = np.arange(T * D, dtype=np.float64).reshape(T, D)
    owner = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"out: shares memory with x"):
        c_backend.dispatch(x, owner, K, out=x.reshape(E, C, D))
    eo = np.arange(E * C * D, dtype=np.float64).reshape(E, C, D)
    idx, pos = np.array([[0], [0], [1], [1]]), np.array([[0], [1], [0], [1]])
    with pytest.raises(ValueError, match=r"out: shares memory with expert_out"):
        c_backend.combine(eo, idx, pos, out=eo.reshape(T, D))
    w = np.ones((T, K))
    buf = np.zeros(T * D + T * K)
    with pytest.raises(ValueError, match=r"out: shares memory with weight"):
        c_backend.combine(eo, idx, pos, buf[:T * K].reshape(T, K), out=buf[T * K - 1:-1]
                          .reshape(T, D))
    # precise, not by bounds: the even and odd columns of one buffer do not overlap
    inter = np.zeros((T, 2 * D))
    inter[:, ::2] = x
    out = np.zeros((E, C, D))
    c_backend.dispatch(inter[:, ::2], owner, K, out=out)  # x is a strided view, out separate
    np.testing.assert_array_equal(out, get_backend("numpy").dispatch(x, owner, K))
    np.testing.assert_array_equal(c_backend.combine(eo, idx, pos, w, out=np.empty((T, D))),
                                  get_backend("numpy").combine(eo, idx, pos, w))


# ------------------------------------------------------------------ threads
def test_set_num_threads_is_bounded(c_backend):
    before = c_backend.get_num_threads()
    cap = c_backend.max_num_threads
    assert cap >= before >= 1
    for n in (cap + 1, 2000, 2**31, 2**40):
        with pytest.raises(ValueError, match=rf"n: expected at most {cap} threads"):
            c_backend.set_num_threads(n)
        assert c_backend.get_num_threads() == before  # nothing changed
    x = np.ones((3, 2))
    c_backend.dispatch(x, [[0, 1, 2]], 1)  # the process is alive and the C core still runs


def test_set_num_threads_is_process_wide(c_backend):
    if not c_backend.openmp:
        pytest.skip("built without OpenMP: always one thread")
    default = c_backend.get_num_threads()
    n = 3 if default != 3 else 2
    seen = []
    with c_backend.num_threads(n):
        t = threading.Thread(target=lambda: seen.append(c_backend.get_num_threads()))
        t.start()
        t.join()
    t = threading.Thread(target=lambda: seen.append(c_backend.get_num_threads()))
    t.start()
    t.join()
    assert seen == [n, default]


def test_between_blas_calls_is_one_thread_for_this_thread_only(c_backend):
    if not c_backend.openmp:
        pytest.skip("built without OpenMP: always one thread")
    n = 3 if c_backend.get_num_threads() != 3 else 2
    seen = []

    def other() -> None:
        seen.append(c_backend.get_num_threads())

    with c_backend.num_threads(n):
        with c_backend.between_blas_calls():
            with c_backend.between_blas_calls():  # nested
                seen.append(c_backend.get_num_threads())
            seen.append(c_backend.get_num_threads())
            t = threading.Thread(target=other)
            t.start()
            t.join()
        seen.append(c_backend.get_num_threads())
        with pytest.raises(KeyError), c_backend.between_blas_calls():
            raise KeyError("left by an exception")
        seen.append(c_backend.get_num_threads())
    assert seen == [1, 1, n, n, n]


def test_the_layer_runs_its_c_steps_on_one_thread(c_backend, monkeypatch):
    """MoELayer's forward and backward call the C core between BLAS calls, on one thread: OpenMP
    workers left spinning would take the cores from the next matmul (pymoe.backend.c_backend)."""
    if not c_backend.openmp:
        pytest.skip("built without OpenMP: always one thread")
    from pymoe import MoELayer

    layer = MoELayer(16, 32, 4, k=2, activation="swiglu", backend="c", seed=0)
    counts: list[int] = []
    for name in ("combine", "form_forward", "form_backward", "gate_grad"):
        real = getattr(layer.backend, name)

        def spy(*args, _real=real, **kwargs):
            counts.append(layer.backend.get_num_threads())
            return _real(*args, **kwargs)
        monkeypatch.setattr(layer.backend, name, spy)
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    with c_backend.num_threads(2):
        layer.backward(layer.forward(x))
        assert c_backend.get_num_threads() == 2
    assert len(counts) >= 4 and set(counts) == {1}
