"""Dispatch, combine and their backward (gate_grad) in C and CUDA against the NumPy reference,
forward and backward, and the C core's edge sizes and layer. CUDA: emulated on the
CPU here, on a GPU when one is visible (the `gpu` parameter); the same sweeps as the C core:
dispatch/combine bitwise (against NumPy and the C core), gate gradients to the tolerances stated
in helpers.py."""
import os

import numpy as np
import pytest
from problems import problem, ref_routing, routed

import pymoe
from helpers import (
    DOWNSTREAM_RTOL,
    FD_RTOL,
    assert_dot_close,
    check_layer_gradients,
    randomize,
    rel_norm_error,
)
from props import given, settings, st
from pymoe.backend.numpy_backend import NumpyBackend

REF = NumpyBackend()


def _abs_dot(dy, expert_out, r):
    """sum_d |dy[t, d] * expert_out[e, p, d]| per kept pair (the dot-product error scale)."""
    return REF.gate_grad(np.abs(dy), np.abs(expert_out), r.expert_index, r.position)


@given(routed(), st.booleans())
def test_dispatch_and_combine_are_bitwise_equal_to_numpy(c_backend, case, weighted):
    r, x, rng = case
    K, dt = r.k, x.dtype
    w = r.gate.astype(dt) if weighted else None
    for naive in (False, True):
        got = c_backend.dispatch(x, r.slot_owner, K, w, naive=naive)
        np.testing.assert_array_equal(got, REF.dispatch(x, r.slot_owner, K, w))
        out = rng.normal(size=got.shape).astype(dt)  # garbage in unused slots is never read
        got_y = c_backend.combine(out, r.expert_index, r.position, w, naive=naive)
        np.testing.assert_array_equal(got_y, REF.combine(out, r.expert_index, r.position, w))


@given(routed())
def test_backward_ops_match_numpy(c_backend, case):
    r, x, rng = case
    T, D = x.shape
    dt, K = x.dtype, r.k
    gate = r.gate.astype(dt)
    out = rng.normal(size=(r.num_experts, r.capacity, D)).astype(dt)
    dy = rng.normal(size=(T, D)).astype(dt)
    # combine backward: d_expert_out = dispatch(gate * dy), dgate = <dy, expert_out>
    np.testing.assert_array_equal(c_backend.dispatch(dy, r.slot_owner, K, gate),
                                  REF.dispatch(dy, r.slot_owner, K, gate))
    ref = REF.gate_grad(dy, out, r.expert_index, r.position)
    for naive in (False, True):
        got = c_backend.gate_grad(dy, out, r.expert_index, r.position, naive=naive)
        assert got.dtype == dt
        assert_dot_close(got, ref, _abs_dot(dy, out, r), D)
        assert np.all(got[~r.kept] == 0)
    # dispatch backward: dx = combine with unit weights
    d_in = rng.normal(size=out.shape).astype(dt)
    np.testing.assert_array_equal(c_backend.combine(d_in, r.expert_index, r.position),
                                  REF.combine(d_in, r.expert_index, r.position))


@pytest.mark.parametrize("T,E,K,cf", [(0, 4, 2, 1.0), (9, 1, 1, 1.0), (9, 4, 4, 1.0),
                                      (9, 5, 2, 0.01), (12, 3, 3, None)])
def test_edge_sizes(c_backend, T, E, K, cf):
    """T=0, E=1, K=E, C=1 (cf tiny) and dropless."""
    rng = np.random.default_rng(T + E + K)
    r = pymoe.route(rng.normal(size=(T, E)), K, cf)
    if cf == 0.01:
        assert r.capacity == 1
    position, owner, _ = c_backend.assign_slots(r.expert_index, r.token_order, E, r.capacity)
    np.testing.assert_array_equal(position, r.position)
    x = rng.normal(size=(T, 5))
    np.testing.assert_array_equal(c_backend.dispatch(x, owner, K), REF.dispatch(x, owner, K))
    ein = REF.dispatch(x, owner, K)
    np.testing.assert_array_equal(c_backend.combine(ein, r.expert_index, position, r.gate),
                                  REF.combine(ein, r.expert_index, position, r.gate))


@pytest.mark.parametrize("K,D", [(10, 1100), (16, 513), (12, 7)])
def test_many_choices_take_the_plain_combine_loop(c_backend, K, D):
    """More than 8 kept choices per token (moe_ops.h, COMBINE_DIRECT = 8) fall back to the plain
    combine loop inside the tuned function; wide and narrow rows. Bitwise equal to NumPy."""
    rng = np.random.default_rng(K)
    T, E = 40, K + 2
    r = pymoe.route(rng.normal(size=(T, E)), K, None)  # dropless: every token keeps K > 8
    assert r.kept.all()
    for dt in (np.float32, np.float64):
        out = rng.normal(size=(E, r.capacity, D)).astype(dt)
        gate = r.gate.astype(dt)
        for w in (gate, None):
            for naive in (False, True):
                got = c_backend.combine(out, r.expert_index, r.position, w, naive=naive)
                np.testing.assert_array_equal(got, REF.combine(out, r.expert_index, r.position, w))


def test_everything_dropped(c_backend):
    """C = 0 drops every pair: empty slot map, zero expert buffers, zero outputs."""
    idx = np.array([[0, 1], [1, 0], [0, 1]])
    position, owner, load = c_backend.assign_slots(idx, None, 2, 0)
    assert owner.shape == (2, 0) and np.all(position == -1)
    np.testing.assert_array_equal(load, [3, 3])  # the load counts pairs before dropping
    # C = 1: first choices claim t0 -> e0 and t1 -> e1; every later pair finds its expert full.
    position, owner, load = c_backend.assign_slots(idx, None, 3, 1)
    np.testing.assert_array_equal(load, [3, 3, 0])
    np.testing.assert_array_equal(position, [[0, -1], [0, -1], [-1, -1]])
    np.testing.assert_array_equal(owner, [[0], [2], [-1]])  # t*K + j
    y = c_backend.combine(np.ones((2, 1, 4)), idx, np.full((3, 2), -1), np.ones((3, 2)))
    np.testing.assert_array_equal(y, np.zeros((3, 4)))
    g = c_backend.gate_grad(np.ones((3, 4)), np.ones((2, 1, 4)), idx, np.full((3, 2), -1))
    np.testing.assert_array_equal(g, np.zeros((3, 2)))


def test_one_and_two_threads_give_identical_bits(c_backend):
    if not c_backend.openmp:
        pytest.skip("built without OpenMP: there is only one thread")
    rng = np.random.default_rng(0)
    T, D, E, K = 3000, 257, 16, 2
    r = pymoe.route(rng.normal(size=(T, E)), K, 1.0)
    x, dy = (rng.normal(size=(T, D)).astype(np.float32) for _ in range(2))
    gate = r.gate.astype(np.float32)

    def run():
        ein = c_backend.dispatch(x, r.slot_owner, K, gate)
        y = c_backend.combine(ein, r.expert_index, r.position, gate)
        g = c_backend.gate_grad(dy, ein, r.expert_index, r.position)
        return ein, y, g

    with c_backend.num_threads(1):
        one = run()
    with c_backend.num_threads(2):
        two = run()
        assert c_backend.get_num_threads() == 2
    for a, b in zip(one, two):
        assert a.tobytes() == b.tobytes()


def test_out_buffers_are_checked_and_used(c_backend):
    rng = np.random.default_rng(1)
    r = pymoe.route(rng.normal(size=(20, 4)), 2, 1.0)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    buf = np.full((4, r.capacity, 8), np.nan, np.float32)
    got = c_backend.dispatch(x, r.slot_owner, 2, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, REF.dispatch(x, r.slot_owner, 2))
    with pytest.raises(ValueError, match=r"out: expected shape \[4, 10, 8\] and dtype float32"):
        c_backend.dispatch(x, r.slot_owner, 2, out=np.empty((4, 10, 8), np.float64))
    with pytest.raises(ValueError, match="out: expected a C-contiguous, writeable array"):
        c_backend.combine(buf, r.expert_index, r.position, out=np.empty((8, 20), np.float32).T)


# ---------------------------------------------------------------------- the layer on the C backend

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("priority", ["choice", "score"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])  # relu: the C epilogues
def test_layer_c_equals_layer_numpy(c_backend, dtype, priority, activation):
    kw = dict(d_model=24, d_hidden=40, num_experts=6, k=2, capacity_factor=0.9,
              priority=priority, activation=activation, aux_loss_coef=0.1, z_loss_coef=0.01,
              dtype=dtype, seed=5)
    lc, ln = pymoe.MoELayer(backend="c", **kw), pymoe.MoELayer(backend="numpy", **kw)
    assert lc.backend.name == "c" and ln.backend.name == "numpy"
    rng = np.random.default_rng(2)
    x, dy = (rng.normal(size=(4, 50, 24)).astype(dtype) for _ in range(2))
    y_c, y_n = lc.forward(x), ln.forward(x)
    assert lc.routing.dropped_fraction > 0
    np.testing.assert_array_equal(lc.routing.position, ln.routing.position)
    np.testing.assert_array_equal(y_c, y_n)  # same routing, same data movement, same BLAS
    dx_c, dx_n = lc.backward(dy), ln.backward(dy)
    for name in ("w1", "b1", "w2", "b2"):  # no gate gradient involved: bitwise
        np.testing.assert_array_equal(lc.grads[name], ln.grads[name], err_msg=name)
    tol = DOWNSTREAM_RTOL[np.dtype(dtype)]
    assert rel_norm_error(dx_c, dx_n) <= tol
    for name in ("w_router", "b_router"):
        assert rel_norm_error(lc.grads[name], ln.grads[name]) <= tol, name


def test_layer_gradients_on_c_backend_match_finite_differences(c_backend):
    layer = pymoe.MoELayer(4, 6, 4, 2, 0.5, normalize=True, aux_loss_coef=0.3, z_loss_coef=0.05,
                           backend="c", dtype=np.float64, seed=0)
    randomize(layer, seed=11)
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
    errors = check_layer_gradients(layer, x, dy)
    assert layer.routing.dropped_fraction > 0
    assert max(errors.values()) <= FD_RTOL, errors


def test_auto_picks_c_and_reports_it(c_backend):
    assert pymoe.MoELayer(4, 4, 2, 1).backend.name == "c"
    info = pymoe.backends()["c"]
    assert info.available and "C core" in info.detail


def test_sanitizer_build_is_the_one_loaded(c_backend):
    """CI reruns the C tests on an ASan+UBSan build; make sure that build is really the one here."""
    if os.environ.get("PYMOE_EXPECT_SANITIZER") != "1":
        pytest.skip("not the sanitizer run (CI sets PYMOE_EXPECT_SANITIZER=1 for it)")
    assert "ASan+UBSan" in c_backend.build_config


# ---------------------------------------------------------------------------------- CUDA
def check_dispatch_combine_and_backward(cuda_impl, c_core, case, weighted):
    logits, K, cf, priority, D, block, rng = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    r = ref_routing(logits.astype(np.float64), K, cf, priority)
    dt = logits.dtype
    T, E, C = r.num_tokens, r.num_experts, r.capacity
    x, dy = (rng.normal(size=(T, D)).astype(dt) for _ in range(2))
    out = rng.normal(size=(E, C, D)).astype(dt)
    gate = r.gate.astype(dt)
    w = dev(gate) if weighted else None
    w_ref = gate if weighted else None
    with be.block_size(block):
        got = be.dispatch(dev(x), dev(r.slot_owner), K, w)
        for peer in [REF] + c_core:  # bitwise: NumPy and the C core
            np.testing.assert_array_equal(host(got), peer.dispatch(x, r.slot_owner, K, w_ref))
        y = be.combine(dev(out), dev(r.expert_index), dev(r.position), w)
        for peer in [REF] + c_core:
            np.testing.assert_array_equal(host(y), peer.combine(out, r.expert_index, r.position,
                                                                w_ref))
        g = be.gate_grad(dev(dy), dev(out), dev(r.expert_index), dev(r.position))
    abs_dot = REF.gate_grad(np.abs(dy), np.abs(out), r.expert_index, r.position)
    assert_dot_close(host(g), REF.gate_grad(dy, out, r.expert_index, r.position), abs_dot, D)
    assert np.all(host(g)[~r.kept] == 0)


@settings(max_examples=40)
@given(problem(), st.booleans())
def test_dispatch_combine_and_backward_match_reference(cuda_impl, c_core, case, weighted):
    check_dispatch_combine_and_backward(cuda_impl, c_core, case, weighted)


@settings(max_examples=4)
@given(problem(blocks=(512, 1024)), st.booleans())
def test_dispatch_combine_and_backward_large_blocks(cuda_impl, c_core, case, weighted):
    check_dispatch_combine_and_backward(cuda_impl, c_core, case, weighted)


@pytest.mark.parametrize("block", [256, 1024])
def test_large_blocks(cuda_impl, block):
    """The default block size and the largest, on one ragged problem (slow to emulate: kept small)."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(block)
    T, E, K, D = 37, 5, 2, 13
    logits = rng.normal(size=(T, E))
    r = pymoe.route(logits, K, 0.8, priority="score")
    x = rng.normal(size=(T, D))
    with be.block_size(block):
        probs, index, _ = be.softmax_top_k(dev(logits), K)
        position, owner, _ = be.assign_slots(index, dev(r.token_order), E, r.capacity)
        ein = be.dispatch(dev(x), owner, K)
        g = be.gate_grad(dev(x), ein, index, position)
    np.testing.assert_array_equal(host(position), r.position)
    np.testing.assert_array_equal(host(ein), REF.dispatch(x, r.slot_owner, K))
    abs_dot = REF.gate_grad(np.abs(x), np.abs(host(ein)), r.expert_index, r.position)
    assert_dot_close(host(g), REF.gate_grad(x, host(ein), r.expert_index, r.position), abs_dot, D)


def test_everything_dropped_on_the_device(cuda_impl):
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    index = dev(np.array([[0, 1], [1, 0], [0, 1]]))
    position, owner, load = be.assign_slots(index, None, 2, 0)
    assert np.all(host(position) == -1) and host(owner).shape == (2, 0)
    np.testing.assert_array_equal(host(load), [3, 3])
    y = be.combine(dev(np.ones((2, 1, 4))), index, dev(np.full((3, 2), -1)), dev(np.ones((3, 2))))
    np.testing.assert_array_equal(host(y), np.zeros((3, 4)))


def test_invalid_indices_are_reported_not_followed(cuda_impl):
    be, dev = cuda_impl.backend, cuda_impl.to_device
    x = dev(np.ones((3, 4)))
    with pytest.raises(ValueError, match="slot_owner entry is outside"):
        be.dispatch(x, dev(np.array([[0, 6]])), 2)
    out = dev(np.ones((2, 2, 4)))
    with pytest.raises(ValueError, match="position entry is outside"):
        be.combine(out, dev(np.array([[0, 1]])), dev(np.array([[0, 2]])))
    with pytest.raises(ValueError, match="expert_index entry is outside"):
        be.gate_grad(dev(np.ones((1, 4))), out, dev(np.array([[0, 5]])), dev(np.array([[0, 0]])))


def test_wrapper_checks_shapes_and_sizes(cuda_impl):
    be, dev = cuda_impl.backend, cuda_impl.to_device
    with pytest.raises(ValueError, match=r"weight: expected shape \[3, 2\], got \(2, 3\)"):
        be.dispatch(dev(np.zeros((3, 4))), dev(np.array([[0, 1]])), 2, dev(np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"threads: expected a power of two in \[32, 1024\], got 48"):
        be.set_block_size(48)


def test_raw_device_pointers(cuda_impl):
    """DeviceArray(ptr, shape, dtype): the path for device memory CuPy did not allocate."""
    from pymoe.backend.cuda_backend import DeviceArray

    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(0)
    r = pymoe.route(rng.normal(size=(10, 3)), 2, 1.0)
    x, owner = dev(rng.normal(size=(10, 5))), dev(r.slot_owner)
    out = dev(np.zeros((3, r.capacity, 5)))

    def raw(a):
        ptr = a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr
        return DeviceArray(ptr, a.shape, a.dtype)

    be.dispatch(raw(x), raw(owner), 2, out=raw(out))
    np.testing.assert_array_equal(host(out), REF.dispatch(host(x), r.slot_owner, 2))


def test_non_contiguous_inputs_are_copied_and_kept_alive(cuda_impl):
    """Strided and Fortran-ordered inputs become contiguous copies that outlive the kernel."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    xp = np if cuda_impl.label == "emulated" else __import__("cupy")
    rng = np.random.default_rng(4)
    r = pymoe.route(rng.normal(size=(30, 4)), 2, 0.9)
    out = rng.normal(size=(4, r.capacity, 6))
    gate = r.gate.copy()
    y = be.combine(dev(out), xp.asfortranarray(dev(r.expert_index)),
                   xp.asfortranarray(dev(r.position)), xp.asfortranarray(dev(gate)))
    np.testing.assert_array_equal(host(y), REF.combine(out, r.expert_index, r.position, gate))
    x = dev(rng.normal(size=(30, 12)))[:, ::2]
    got = be.dispatch(x, dev(r.slot_owner), 2, xp.asfortranarray(dev(gate)))
    np.testing.assert_array_equal(host(got), REF.dispatch(host(x), r.slot_owner, 2, gate))
    g = be.gate_grad(x, dev(out), dev(r.expert_index), xp.asfortranarray(dev(r.position)))
    assert np.all(host(g)[~r.kept] == 0)


def test_raw_pointers_without_cupy_still_report_bad_input(cuda_emulator_path):
    """With no array library at all (raw DeviceArray pointers only, as on a GPU machine without
    CuPy), bad indices and a repeated token_order entry are still reported."""
    from pymoe.backend import cuda_backend
    from pymoe.backend.cuda_backend import CudaBackend, DeviceArray

    loaded, _ = cuda_backend.load(cuda_emulator_path)
    be = CudaBackend(loaded.ffi, loaded.lib, memory=None, emulated=True)

    def raw(a):
        return DeviceArray(a.ctypes.data, a.shape, a.dtype)

    x, owner = np.ones((3, 4)), np.array([[0, 6]])
    out = np.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="slot_owner entry is outside"):
        be.dispatch(raw(x), raw(owner), 2, out=raw(out))
    with pytest.raises(TypeError, match="out: required when CuPy is not installed"):
        be.dispatch(raw(x), raw(np.array([[0, 1]])), 2)
    index, order = np.array([[0], [1], [0]]), np.array([0, 0, 1])
    with pytest.raises(ValueError, match=r"token_order is not a permutation of 0..T-1"):
        be.assign_slots(raw(index), raw(order), 2, 2, out=tuple(
            raw(b) for b in (np.empty((3, 1), np.int64), np.empty((2, 2), np.int64),
                             np.empty(2, np.int64))))
    good = np.array([[0, 1]])
    be.dispatch(raw(x), raw(good), 2, out=raw(out))  # and valid input goes through
    np.testing.assert_array_equal(out[0], np.ones((2, 4)))
    logits = np.random.default_rng(0).normal(size=(6, 3))
    r = pymoe.route(logits, 2, 1.0, priority="score")
    bufs = [np.empty((6, 3)), np.empty((6, 2), np.int64), np.empty((6, 2))]
    be.softmax_top_k(raw(logits), 2, out=tuple(raw(b) for b in bufs))
    np.testing.assert_array_equal(bufs[1], r.expert_index)
    slots = [np.empty((6, 2), np.int64), np.empty((3, r.capacity), np.int64),
             np.empty(3, np.int64)]
    be.assign_slots(raw(bufs[1]), raw(r.token_order), 3, r.capacity,
                    out=tuple(raw(b) for b in slots))
    np.testing.assert_array_equal(slots[0], r.position)


@pytest.mark.parametrize("D,block,dtype", [(1000, 256, np.float64), (4099, 1024, np.float32),
                                           (517, 64, np.float32)])
def test_wide_rows_in_row_groups(cuda_impl, c_core, D, block, dtype):
    """Rows wide enough for row groups of 64 to 1024 threads (several rows per block otherwise),
    ragged D (scalar head and tail around the vector body): bitwise equal to NumPy and C."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(D)
    T, E, K = 13, 3, 2
    r = pymoe.route(rng.normal(size=(T, E)), K, 0.9)
    x = rng.normal(size=(T, D)).astype(dtype)
    out = rng.normal(size=(E, r.capacity, D)).astype(dtype)
    gate = r.gate.astype(dtype)
    with be.block_size(block):
        ein = be.dispatch(dev(x), dev(r.slot_owner), K, dev(gate))
        y = be.combine(dev(out), dev(r.expert_index), dev(r.position), dev(gate))
    for peer in [REF] + c_core:
        np.testing.assert_array_equal(host(ein), peer.dispatch(x, r.slot_owner, K, gate))
        np.testing.assert_array_equal(host(y), peer.combine(out, r.expert_index, r.position, gate))
