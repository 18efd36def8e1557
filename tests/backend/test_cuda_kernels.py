"""The CUDA kernels against the NumPy reference: emulated on the CPU here, on a GPU when one is
visible (the `gpu` parameter). Same sweeps as the C core: integers exact, dispatch/combine bitwise,
probabilities and gate gradients to the tolerances stated in helpers.py."""
import warnings

import numpy as np
import pytest

import pymoe
from helpers import GATE_RTOL, PROB_RTOL, assert_dot_close
from props import given, settings, st
from pymoe.backend.numpy_backend import NumpyBackend

REF = NumpyBackend()


SMALL_BLOCKS = [32, 64, 128, 256]  # every example; 512 and 1024 in the *_large_blocks sweeps


@st.composite
def problem(draw, blocks=tuple(SMALL_BLOCKS)):
    T = draw(st.integers(0, 48))
    E = draw(st.integers(1, 40))  # past 32: more than one value per lane in the warp router
    K = draw(st.integers(1, min(E, 6)))
    D = draw(st.sampled_from([1, 3, 4, 8, 13, 64, 70]))  # ragged and vector-friendly widths
    cf = draw(st.one_of(st.none(), st.floats(0.05, 2.5)))
    priority = draw(st.sampled_from(["choice", "score"]))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    block = draw(st.sampled_from(list(blocks)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    logits = rng.normal(size=(T, E))
    if draw(st.booleans()):
        logits = np.round(logits)  # ties between experts and between tokens
    return logits.astype(dtype), K, cf, priority, D, block, rng


def _ref_routing(logits, K, cf, priority, normalize=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # normalize with K=1 warns; the values still count
        return pymoe.route(logits, K, cf, priority=priority, normalize=normalize)


def check_softmax_top_k(cuda_impl, case, normalize):
    logits, K, _, _, _, block, _ = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    r = _ref_routing(logits, K, None, "choice", normalize)
    with be.block_size(block):
        probs, index, gate = be.softmax_top_k(dev(logits), K, normalize)
    np.testing.assert_array_equal(host(index), r.expert_index)  # ranks logits: exact
    tol = PROB_RTOL[logits.dtype]
    np.testing.assert_allclose(host(probs), r.probs, rtol=tol, atol=tol)
    np.testing.assert_allclose(host(gate), r.gate_before_drop, rtol=GATE_RTOL[logits.dtype],
                               atol=tol)


@settings(max_examples=40)
@given(problem(), st.booleans())
def test_softmax_top_k_matches_reference(cuda_impl, case, normalize):
    check_softmax_top_k(cuda_impl, case, normalize)


@settings(max_examples=4)
@given(problem(blocks=(512, 1024)), st.booleans())
def test_softmax_top_k_large_blocks(cuda_impl, case, normalize):
    check_softmax_top_k(cuda_impl, case, normalize)


@settings(max_examples=40)
@given(problem())
def test_slots_match_reference(cuda_impl, case):
    logits, K, cf, priority, _, block, _ = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    r = _ref_routing(logits, K, cf, priority)
    order = dev(r.token_order) if priority == "score" else None
    with be.block_size(block):
        position, owner, load = be.assign_slots(dev(r.expert_index), order, r.num_experts,
                                                r.capacity)
    np.testing.assert_array_equal(host(position), r.position)
    np.testing.assert_array_equal(host(owner), r.slot_owner)
    np.testing.assert_array_equal(host(load), r.expert_load)


def check_dispatch_combine_and_backward(cuda_impl, c_core, case, weighted):
    logits, K, cf, priority, D, block, rng = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    r = _ref_routing(logits.astype(np.float64), K, cf, priority)
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


@pytest.mark.parametrize("T,E,K,cf", [(0, 4, 2, 1.0), (9, 1, 1, 1.0), (9, 4, 4, 1.0),
                                      (9, 5, 2, 0.01), (12, 3, 3, None)])
def test_edge_sizes(cuda_impl, T, E, K, cf):
    """T=0, E=1, K=E, C=1 and dropless, through the device route()."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    logits = np.random.default_rng(T + E).normal(size=(T, E))
    r = pymoe.route(logits, K, cf)
    d = be.route(dev(logits), K, cf)
    assert d.capacity == r.capacity
    np.testing.assert_array_equal(host(d.position), r.position)
    np.testing.assert_array_equal(host(d.slot_owner), r.slot_owner)
    np.testing.assert_allclose(host(d.gate), r.gate, rtol=GATE_RTOL[np.dtype(np.float64)])


def test_device_route_with_score_priority(cuda_impl):
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    logits = np.random.default_rng(3).normal(size=(40, 6)).astype(np.float32)
    r = pymoe.route(logits, 2, 0.7, priority="score", normalize=True)
    d = be.route(dev(logits), 2, 0.7, priority="score", normalize=True)
    np.testing.assert_array_equal(host(d.token_order), r.token_order)
    np.testing.assert_array_equal(host(d.position), r.position)
    np.testing.assert_allclose(host(d.gate), r.gate, rtol=GATE_RTOL[np.dtype(np.float32)])


def test_everything_dropped(cuda_impl):
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    index = dev(np.array([[0, 1], [1, 0], [0, 1]]))
    position, owner, load = be.assign_slots(index, None, 2, 0)
    assert np.all(host(position) == -1) and host(owner).shape == (2, 0)
    np.testing.assert_array_equal(host(load), [3, 3])
    y = be.combine(dev(np.ones((2, 1, 4))), index, dev(np.full((3, 2), -1)), dev(np.ones((3, 2))))
    np.testing.assert_array_equal(host(y), np.zeros((3, 4)))


# ------------------------------------------------------------------ invalid input on the device

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
    with pytest.raises(ValueError, match="expert_index entry is outside"):
        be.assign_slots(dev(np.array([[0], [7]])), None, 2, 2)
    with pytest.raises(ValueError, match=r"token_order is not a permutation of 0..T-1"):
        be.assign_slots(dev(np.array([[0], [1], [0]])), dev(np.array([0, 0, 1])), 2, 2)
    with pytest.raises(ValueError, match=r"token_order is not a permutation of 0..T-1"):
        be.assign_slots(dev(np.array([[0], [1], [0]])), dev(np.array([0, 3, 1])), 2, 2)
    with pytest.raises(ValueError, match="a score or bias entry is NaN"):
        be.top_k(dev(np.array([[0.0, np.nan, 1.0]])), 2)
    with pytest.raises(ValueError, match="a score or bias entry is NaN"):
        be.softmax_top_k(dev(np.array([[0.0, np.nan, 1.0]])), 2)


def test_wrapper_checks_kinds_shapes_and_sizes(cuda_impl):
    be, dev = cuda_impl.backend, cuda_impl.to_device
    with pytest.raises(TypeError, match="router_logits: expected dtype float32 or float64, got"):
        be.softmax_top_k(dev(np.zeros((2, 3), np.float16)), 1)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 3\], got 4"):
        be.softmax_top_k(dev(np.zeros((2, 3))), 4)
    with pytest.raises(ValueError, match=r"weight: expected shape \[3, 2\], got \(2, 3\)"):
        be.dispatch(dev(np.zeros((3, 4))), dev(np.array([[0, 1]])), 2, dev(np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"threads: expected a power of two in \[32, 1024\], got 48"):
        be.set_block_size(48)
    with pytest.raises(TypeError, match="expected dtype int64"):
        be.assign_slots(dev(np.zeros((2, 1), np.int32)), None, 2, 1)


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
