"""No input, however wrong, makes the C core read or write out of bounds.

The raw entry points are called directly here, bypassing the Python checks, with exactly sized
buffers: they must return the documented error code (pymoe.h) and leave memory alone. CI runs this
file again on an AddressSanitizer + UBSan build, where any stray access aborts the run.
"""
import numpy as np
import pytest

import pymoe
from pymoe.backend import c_backend as cb

_be, _ = cb.load()  # None when the core is not built: then every test that calls C skips
OK, ERR_SIZE, ERR_NULL, ERR_EXPERT, ERR_POSITION, ERR_OWNER, ERR_ORDER = (
    (None,) * 7 if _be is None else
    (getattr(_be.lib, f"PYMOE_{n}") for n in ("OK", "ERR_SIZE", "ERR_NULL", "ERR_EXPERT",
                                              "ERR_POSITION", "ERR_OWNER", "ERR_ORDER")))
BIG = 2**62


def _n(n: int) -> int:
    """Buffer length for n elements; oversized requests (the overflow cases, which must fail
    before any access) get a small buffer, so a stray write would still land outside it."""
    return max(min(n, 4096), 1)


@pytest.fixture
def raw(c_backend):
    ffi, lib = c_backend.ffi, c_backend.lib

    def buf(values, ctype="int64_t"):
        values = list(values)
        return ffi.new(f"{ctype}[]", values) if values else ffi.NULL

    return ffi, lib, buf



def _slots(raw, expert_index, T, K, E, C, order=None):
    ffi, lib, buf = raw
    pos, owner, load = (ffi.new("int64_t[]", _n(n)) for n in (T * K, E * C, E))
    return lib.pymoe_assign_slots(pos, owner, load, buf(expert_index),
                                  ffi.NULL if order is None else buf(order), T, K, E, C)


def test_assign_slots_rejects_bad_experts_orders_and_sizes(raw):
    assert _slots(raw, [0, 1, 1, 0], 2, 2, 2, 2) == OK
    assert _slots(raw, [0, 2, 1, 0], 2, 2, 2, 2) == ERR_EXPERT  # e == E
    assert _slots(raw, [0, -1, 1, 0], 2, 2, 2, 2) == ERR_EXPERT
    assert _slots(raw, [0, 0], 2, 1, 0, 1) == ERR_EXPERT  # E = 0: nothing is a valid expert
    assert _slots(raw, [0, 1, 1, 0], 2, 2, 2, 2, order=[1, 1]) == ERR_ORDER
    assert _slots(raw, [0, 1, 1, 0], 2, 2, 2, 2, order=[0, 2]) == ERR_ORDER
    assert _slots(raw, [0, 1, 1, 0], 2, 2, 2, 2, order=[-1, 0]) == ERR_ORDER
    assert _slots(raw, [], -1, 2, 2, 2) == ERR_SIZE
    assert _slots(raw, [], 2, 2, 2, -3) == ERR_SIZE
    assert _slots(raw, [], BIG, 4, 2, 2) == ERR_SIZE  # T*K overflows int64
    assert _slots(raw, [], 0, 2, 3, 1) == OK  # T = 0
    ffi, lib, _ = raw
    assert lib.pymoe_assign_slots(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL,
                                  1, 1, 1, 1) == ERR_NULL


def _dispatch(raw, owner, T, K, E, C, D, weight=False):
    ffi, lib, buf = raw
    out = ffi.new("float[]", _n(E * C * D))
    x = ffi.new("float[]", _n(T * D))
    w = ffi.new("float[]", _n(T * K)) if weight else ffi.NULL
    return lib.pymoe_dispatch_f32(out, x, buf(owner), w, T, K, E, C, D), \
        lib.pymoe_dispatch_naive_f32(out, x, buf(owner), w, T, K, E, C, D)


def test_dispatch_rejects_bad_slot_owners_and_sizes(raw):
    assert _dispatch(raw, [0, 3, -1, 2], 2, 2, 2, 2, 5, weight=True) == (OK, OK)
    assert _dispatch(raw, [0, 4, -1, 2], 2, 2, 2, 2, 5) == (ERR_OWNER, ERR_OWNER)  # == T*K
    assert _dispatch(raw, [0, -2, -1, 2], 2, 2, 2, 2, 5) == (ERR_OWNER, ERR_OWNER)
    assert _dispatch(raw, [0], 0, 2, 1, 1, 5) == (ERR_OWNER, ERR_OWNER)  # T = 0: only -1 fits
    assert _dispatch(raw, [-1], 0, 2, 1, 1, 5) == (OK, OK)
    assert _dispatch(raw, [], 2, 2, 2, 2, -1) == (ERR_SIZE, ERR_SIZE)
    assert _dispatch(raw, [], 2, 2, BIG, 2, 4) == (ERR_SIZE, ERR_SIZE)  # E*C*D overflows
    ffi, lib, buf = raw
    assert lib.pymoe_dispatch_f64(ffi.NULL, ffi.NULL, buf([-1]), ffi.NULL, 1, 1, 1, 1, 3) \
        == ERR_NULL


def _pairs_call(raw, fn, index, position, T, K, E, C, D):
    ffi, lib, buf = raw
    a = ffi.new("double[]", _n(T * D))
    b = ffi.new("double[]", _n(E * C * D))
    o = ffi.new("double[]", _n(T * max(D, K)))
    if fn == "combine":
        return lib.pymoe_combine_f64(o, b, buf(index), buf(position), ffi.NULL, T, K, E, C, D), \
            lib.pymoe_combine_naive_f64(o, b, buf(index), buf(position), ffi.NULL, T, K, E, C, D)
    return lib.pymoe_gate_grad_f64(o, a, b, buf(index), buf(position), T, K, E, C, D), \
        lib.pymoe_gate_grad_naive_f64(o, a, b, buf(index), buf(position), T, K, E, C, D)


@pytest.mark.parametrize("fn", ["combine", "gate_grad"])
def test_combine_and_gate_grad_reject_bad_pairs(raw, fn):
    good = ([0, 1, 1, 0], [0, -1, 0, 1])
    assert _pairs_call(raw, fn, *good, 2, 2, 2, 2, 3) == (OK, OK)
    assert _pairs_call(raw, fn, [0, 2, 1, 0], good[1], 2, 2, 2, 2, 3) == (ERR_EXPERT,) * 2
    assert _pairs_call(raw, fn, [0, 1, -1, 0], good[1], 2, 2, 2, 2, 3) == (ERR_EXPERT,) * 2
    assert _pairs_call(raw, fn, good[0], [0, -1, 0, 2], 2, 2, 2, 2, 3) == (ERR_POSITION,) * 2
    assert _pairs_call(raw, fn, good[0], [0, -2, 0, 1], 2, 2, 2, 2, 3) == (ERR_POSITION,) * 2
    assert _pairs_call(raw, fn, [0], [0], 1, 1, 1, 0, 3) == (ERR_POSITION,) * 2  # C = 0
    assert _pairs_call(raw, fn, [], [], -2, 2, 2, 2, 3) == (ERR_SIZE,) * 2
    assert _pairs_call(raw, fn, [], [], 0, 2, 2, 2, 3) == (OK, OK)


# ------------------------------------------------- the Python wrapper names what is wrong

def test_error_messages_come_from_the_c_core(c_backend):
    ffi, lib = c_backend.ffi, c_backend.lib
    codes = [OK, ERR_SIZE, ERR_NULL, ERR_EXPERT, ERR_POSITION, ERR_OWNER, ERR_ORDER,
             lib.PYMOE_ERR_NOMEM, lib.PYMOE_ERR_NAN, lib.PYMOE_ERR_PAIRS]
    messages = [ffi.string(lib.pymoe_error_string(c)).decode() for c in codes]
    assert len(set(messages)) == len(codes) and "unknown error code" not in messages
    assert messages[5] == "a slot_owner entry is outside [-1, T*K)"
    assert ffi.string(lib.pymoe_error_string(12345)) == b"unknown error code"
    with pytest.raises(ValueError, match=r"C core dispatch: a slot_owner entry is outside "
                                         r"\[-1, T\*K\) \(error code -5\)"):
        c_backend._check("dispatch", ERR_OWNER)


def test_wrapper_names_bad_arguments(c_backend):
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"slot_owner: expected entries in \[-1, 6\), got range"):
        c_backend.dispatch(x, np.array([[0, 6]]), 2)
    with pytest.raises(TypeError, match="x: the C backend takes float32 or float64, got float16"):
        c_backend.dispatch(x.astype(np.float16), np.array([[0, 1]]), 2)
    with pytest.raises(TypeError, match="slot_owner: expected an integer array, got dtype float64"):
        c_backend.dispatch(x, np.zeros((1, 2)), 2)
    with pytest.raises(ValueError, match=r"weight: expected shape \[3, 2\], got \(2, 3\)"):
        c_backend.dispatch(x, np.array([[0, 1]]), 2, np.zeros((2, 3), np.float32))
    out = np.zeros((2, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"position: expected entries in \[-1, 2\)"):
        c_backend.combine(out, np.array([[0, 1]]), np.array([[0, 2]]))
    with pytest.raises(ValueError, match=r"expert_index: expected entries in \[0, 2\)"):
        c_backend.gate_grad(np.zeros((1, 4), np.float32), out, np.array([[0, 5]]),
                            np.array([[0, 0]]))
    with pytest.raises(ValueError, match=r"position: expected shape \[1, 2\], got \(1, 3\)"):
        c_backend.combine(out, np.array([[0, 1]]), np.array([[0, 0, 0]]))
    with pytest.raises(ValueError, match=r"token_order: expected a permutation of 0..2"):
        c_backend.assign_slots(np.array([[0], [1], [0]]), np.array([0, 0, 1]), 2, 2)
    with pytest.raises(ValueError, match=r"dy: expected shape \[1, 4\], got \(1, 5\)"):
        c_backend.gate_grad(np.zeros((1, 5), np.float32), out, np.array([[0, 1]]),
                            np.array([[0, 0]]))


def test_non_contiguous_inputs_are_copied_not_misread(c_backend):
    rng = np.random.default_rng(0)
    r = pymoe.route(rng.normal(size=(10, 3)), 2, 1.0)
    x = np.asfortranarray(rng.normal(size=(10, 6)))[:, ::2]  # strided view
    ref = pymoe.get_backend("numpy").dispatch(np.ascontiguousarray(x), r.slot_owner, 2)
    np.testing.assert_array_equal(c_backend.dispatch(x, r.slot_owner, 2), ref)


def test_asking_for_c_when_missing_says_why(monkeypatch):
    monkeypatch.setenv("PYMOE_DISABLE_C", "1")
    info = pymoe.backends()["c"]
    assert not info.available and "PYMOE_DISABLE_C" in info.detail
    with pytest.raises(RuntimeError, match="backend 'c' is not available: disabled by PYMOE_DISABLE_C"):
        pymoe.MoELayer(4, 4, 2, 1, backend="c")
    assert pymoe.MoELayer(4, 4, 2, 1, backend="auto").backend.name == "numpy"


def test_failed_build_reason_is_reported(monkeypatch, tmp_path):
    """When the optional build failed at install time, backends() shows the recorded error."""
    from pymoe.backend import c_backend as cb

    status = tmp_path / "status.txt"
    status.write_text("the C extension failed to build at install time: command 'cc' failed\n")
    monkeypatch.setattr(cb, "_STATUS_FILE", str(status))
    assert "command 'cc' failed" in cb._why_missing(ImportError("No module named x"))
    monkeypatch.setattr(cb, "_STATUS_FILE", str(tmp_path / "absent.txt"))
    assert "pip install -v" in cb._why_missing(ImportError("No module named x"))


def test_numpy_backend_rejects_what_the_c_backend_rejects():
    """The host backends share their argument checks: same inputs refused, same messages."""
    nb = pymoe.get_backend("numpy")
    out = np.zeros((2, 2, 4))
    with pytest.raises(ValueError, match=r"position: expected entries in \[-1, 2\)"):
        nb.combine(out, np.array([[0, 1]]), np.array([[0, 2]]))  # slot C: past the expert
    with pytest.raises(ValueError, match=r"slot_owner: expected entries in \[-1, 6\)"):
        nb.dispatch(np.zeros((3, 4)), np.array([[0, 6]]), 2)
    with pytest.raises(ValueError, match=r"token_order: expected a permutation"):
        nb.assign_slots(np.array([[0], [1]]), np.array([1, 1]), 2, 1)
    with pytest.raises(ValueError, match=r"dy: expected shape \[1, 4\]"):
        nb.gate_grad(np.zeros((1, 5)), out, np.array([[0, 1]]), np.array([[0, 0]]))
