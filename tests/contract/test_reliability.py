"""Regressions: silent wrong results, a crash and confusing errors found by probing the
public API. Each test failed before its fix."""
from __future__ import annotations

import copy
import pickle
import threading
import tracemalloc

import numpy as np
import pytest

import pymoe
from helpers import backend_by_name
from pymoe import get_backend
from pymoe.dense import dense_tensors
from pymoe.priority import position_in_expert


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float/int array in native order, for bit-for-bit comparison."""
    a = np.asarray(a)
    a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


def assert_same_bits(a, b):
    np.testing.assert_array_equal(bits(a), bits(b))


def layer(**kw) -> pymoe.MoELayer:
    args = dict(d_model=6, d_hidden=5, num_experts=4, k=2, seed=3)
    args.update(kw)
    return pymoe.MoELayer(**args)


# ------------------------------------------------------------------ 1. byte order
@pytest.mark.parametrize("be", ["numpy", "c"])
@pytest.mark.parametrize("order", [">f8", ">f4"])
def test_big_endian_floats_are_read_as_their_values(be, order, request):
    backend = backend_by_name(be, request)
    x = np.ones((1, 2), order)
    w = np.full((1, 1), 2.0, order)
    out = backend.dispatch(x, [[0]], 1, weight=w)
    np.testing.assert_array_equal(out, [[[2.0, 2.0]]])
    eo = np.arange(1.0, 5.0).reshape(2, 1, 2).astype(order)  # [E=2, C=1, D=2]
    idx, pos = np.array([[1]]), np.array([[0]])
    np.testing.assert_array_equal(backend.combine(eo, idx, pos, w), [[6.0, 8.0]])
    dy = np.full((1, 2), 0.5, order)
    np.testing.assert_array_equal(backend.gate_grad(dy, eo, idx, pos), [[3.5]])


def test_route_and_layer_take_big_endian_inputs():
    L = np.random.default_rng(0).normal(size=(9, 5))
    a, b = pymoe.route(L, 2, 1.0), pymoe.route(L.astype(">f8"), 2, 1.0)
    assert_same_bits(a.gate, b.gate)
    assert a.aux_loss == b.aux_loss
    x = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32)
    m = layer()
    assert_same_bits(m.forward(x), m.forward(x.astype(">f4")))


@pytest.mark.parametrize("be", ["numpy", "c"])
def test_longlong_and_big_endian_index_arrays(be, request):
    backend = backend_by_name(be, request)
    idx = np.array([[0, 1], [1, 0], [0, 1]])
    want_pos, want_owner, _ = get_backend("numpy").assign_slots(idx, None, 2, 2)
    for kind in (np.longlong, ">i8", np.int32):
        pos, owner, _ = backend.assign_slots(idx.astype(kind), None, 2, 2)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(owner, want_owner)
        x = np.arange(6.0).reshape(3, 2)
        np.testing.assert_array_equal(backend.dispatch(x, want_owner.astype(kind), 2),
                                      get_backend("numpy").dispatch(x, want_owner, 2))


# ------------------------------------------------------------------ 2. layout
def test_route_bits_do_not_depend_on_layout():
    # The case: F order summed the softmax in another order; the top-1 probabilities
    # then differed by one ulp and the score-priority tie went the other way.
    L = np.float32([[-1.5, 2, -.5, 0, 1.5, 1, 1, 1], [-1.5, 2, 0, 1, 1, 1.5, 1, -.5]])
    want = pymoe.route(L, 1, .5, priority="score")
    rng = np.random.default_rng(5)
    big = rng.normal(size=(33, 7)).astype(np.float32)
    for logits in (L, big):
        want = pymoe.route(logits, 2, 0.5, priority="score")
        wide = np.zeros((logits.shape[0], 2 * logits.shape[1]), np.float32)
        wide[:, ::2] = logits
        for other in (np.asfortranarray(logits), wide[:, ::2], logits[::-1][::-1],
                      np.asfortranarray(logits.T).T.copy(order="F")):
            got = pymoe.route(other, 2, 0.5, priority="score")
            for field in ("probs", "gate", "position", "token_order", "expert_index"):
                assert_same_bits(getattr(got, field), getattr(want, field))
            assert got.aux_loss == want.aux_loss and got.z_loss == want.z_loss
    assert pymoe.route(np.asfortranarray(L), 1, .5, priority="score").position.tolist() == \
        pymoe.route(L, 1, .5, priority="score").position.tolist() == [[0], [-1]]


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_layer_bits_do_not_depend_on_layout(formulation):
    x = np.random.default_rng(2).normal(size=(11, 6)).astype(np.float32)
    dy = np.random.default_rng(3).normal(size=(11, 6)).astype(np.float32)
    m = layer(formulation=formulation)
    y, dx = m.forward(x), m.backward(dy)
    grads = copy.deepcopy(m.grads)
    for xf, dyf in ((np.asfortranarray(x), np.asfortranarray(dy)),
                    (np.repeat(x, 2, axis=1)[:, ::2], dy[::-1][::-1])):
        assert_same_bits(m.forward(xf), y)
        assert_same_bits(m.backward(dyf), dx)
        for name, g in grads.items():
            assert_same_bits(m.grads[name], g)


# ------------------------------------------------------------------ 3. out= aliasing
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


# ------------------------------------------------------------------ 4. threads
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


# ------------------------------------------------------------------ 5. parameters
@pytest.mark.parametrize("name", ["w_router", "b_router", "w1", "b2"])
def test_non_finite_parameter_is_named(name):
    m = layer()
    m.params[name].flat[0] = np.nan
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"params\['{name}'\]: expected finite values, got 1"):
        m.forward(x)


def test_parameter_shape_and_dtype_are_checked():
    m = layer()
    m.params["w1"] = m.params["w1"][:, :, :2]
    with pytest.raises(ValueError, match=r"params\['w1'\]: expected shape \[4, 6, 5\]"):
        m.forward(np.zeros((2, 6), np.float32))
    m = layer()
    m.params["b1"] = m.params["b1"].astype(np.float64)
    with pytest.raises(TypeError, match=r"params\['b1'\]: expected dtype float32"):
        m.forward(np.zeros((2, 6), np.float32))
    m.params["b1"] = "zeros"
    with pytest.raises(TypeError, match=r"params\['b1'\]: expected a numpy array"):
        m.forward(np.zeros((2, 6), np.float32))


def test_forward_overflow_is_said_in_the_callers_terms():
    m = layer()
    m.params["w1"][...] = 1e30  # finite, but x @ w1 overflows float32
    with pytest.raises(ValueError, match=r"^x: the expert outputs overflowed to inf/NaN in "
                                         r"float32 although x and every parameter are finite"):
        m.forward(np.full((4, 6), 1e10, np.float32))
    m = layer()
    m.params["w_router"][...] = 1.0
    with pytest.raises(ValueError, match=r"^x: the router logits .* overflowed"):
        m.forward(np.full((4, 6), 1e38, np.float32))


def test_backward_overflow_names_dy_not_an_internal_argument():
    m = layer(dtype=np.float32, aux_loss_coef=0.0)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    m.forward(x)
    with pytest.raises(ValueError, match=r"^dy: .*overflowed") as err:
        m.backward(np.full((8, 6), 3e38, np.float32))
    assert "dgate" not in str(err.value)


# ------------------------------------------------------------------ 6. dtype=None
def test_layer_dtype_none_is_an_error():
    with pytest.raises(TypeError, match=r"dtype: expected float16, float32 or float64, got None"):
        layer(dtype=None)


# ------------------------------------------------------------------ pickling
@pytest.mark.parametrize("backend", ["auto", "numpy", "c"])
def test_layer_pickles_and_deepcopies(backend, request):
    backend_by_name(backend, request)  # "c": skips or fails where the C core is not built
    m = layer(backend=backend)
    x = np.random.default_rng(4).normal(size=(5, 6)).astype(np.float32)
    y = m.forward(x)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert clone.backend.name == m.backend.name
        assert_same_bits(clone.forward(x), y)
        assert_same_bits(clone.backward(np.ones_like(x)), m.backward(np.ones_like(x)))
        clone.params["w1"][...] = 0  # a real copy: the original is untouched
        assert np.any(m.params["w1"])


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


# ------------------------------------------------------------------ Routing
def test_routing_arrays_are_read_only():
    r = pymoe.route(np.random.default_rng(0).normal(size=(6, 4)), 2, 1.0)
    for name in ("router_logits", "probs", "expert_index", "token_order", "position", "gate",
                 "gate_before_drop", "kept", "expert_load", "slot_owner", "expert_load_kept",
                 "dispatch_mask", "combine_weights"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(r, name)[...] = 0
    logits = np.zeros((3, 2))
    pymoe.route(logits, 1)
    logits[0, 0] = 1.0  # the caller's own array stays writeable


def test_route_backward_checks_a_rebound_routing():
    r = pymoe.route(np.random.default_rng(0).normal(size=(6, 4)), 2, 1.0)
    r.expert_index = np.full((6, 2), 9)
    with pytest.raises(ValueError, match=r"routing.expert_index: expected entries in \[0, 4\)"):
        pymoe.route_backward(r, np.ones((6, 2)))


# ------------------------------------------------------------------ CUDA wrapper
def test_cuda_null_device_pointer_names_the_argument(cuda_emulator_path):
    from pymoe.backend import cuda_backend
    from pymoe.backend.cuda_backend import DeviceArray

    be, info = cuda_backend.load(cuda_emulator_path)
    assert be is not None, info.detail
    owner = np.zeros((1, 1), np.int64)
    with pytest.raises(ValueError, match=r"^x: got a NULL device pointer"):
        be.dispatch(DeviceArray(0, (2, 3), np.float32), owner, 1)
    with pytest.raises(ValueError, match=r"^out: got a NULL device pointer"):
        be.dispatch(np.ones((2, 3), np.float32), owner, 1, out=DeviceArray(0, (1, 1, 3)))
    be.dispatch(DeviceArray(0, (0, 3), np.float32), np.full((1, 1), -1), 1)  # empty: fine
