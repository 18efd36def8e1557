"""Property-based fuzzing of every host backend operation (softmax_lse, top_k, assign_slots,
dispatch, combine, gate_grad, bias_relu, relu_backward; NumPy and C, the C ones also with
naive=True and out=) against the contract in fuzz.py. CI runs this file again on the ASan +
UBSan build of the C core, so an out-of-bounds access the checks let through aborts the run."""
from __future__ import annotations

import numpy as np
import pytest

import fuzz
from helpers import backend_by_name
from props import given, settings, st
from pymoe import get_backend

REF = get_backend("numpy")
BACKENDS = ["numpy", "c"]
FUZZ = settings(max_examples=fuzz.EXAMPLES, deadline=None)


def backend_fuzz(test):
    """A fuzz test of one op: run for each backend (`be`), on hypothesis' `data`."""
    return pytest.mark.parametrize("be", BACKENDS)(FUZZ(given(data=st.data())(test)))


def _c_limit(err: Exception) -> bool:
    """The C core takes float32/float64 only (float16 goes through the NumPy backend)."""
    return isinstance(err, TypeError) and "the C backend takes float32 or float64" in str(err)


def _sizes(data):
    T = data.draw(st.integers(0, 6), label="T")
    K = data.draw(st.integers(1, 3), label="K")
    E = data.draw(st.integers(1, 4), label="E")
    C = data.draw(st.integers(0, 5), label="C")
    D = data.draw(st.integers(0, 5), label="D")
    return T, K, E, C, D


def _routing(data, T, K, E, C):
    """A valid (expert_index, position, slot_owner): K distinct experts per token when K <= E."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="routing seed"))
    idx = np.stack([rng.permutation(max(E, K))[:K] % E for _ in range(T)]) if T else \
        np.zeros((0, K), np.int64)
    pos, owner, _ = REF.assign_slots(idx, None, E, C)
    return idx.astype(np.int64), pos, owner


def _result_like(reference, shape: tuple, a) -> tuple[tuple, np.dtype]:
    """The shape and dtype of the reference's result (an argument may have been spoiled into
    another valid shape), else the nominal shape and the native dtype of array argument a."""
    want, _ = fuzz.run(reference)
    if want is not None:
        return want.shape, want.dtype
    return shape, np.asarray(a).dtype.newbyteorder("=")


def _out_arg(data, backend, shape, dtype, inputs: dict):
    """(out, the message prefix the call must fail with, or None): nothing, a fresh array, a wrong
    one, or one that shares memory with an input."""
    if backend.name != "c":
        return None, None
    how = data.draw(st.sampled_from(["none"] * 4 + ["fresh"] * 4 + ["shape", "dtype", "strided",
                                                                 "readonly", "alias", "alias"]),
                    label="out")
    n = int(np.prod(shape))
    if how == "fresh":
        return np.full(shape, 7, dtype), None
    if how == "shape":
        return np.zeros(shape + (1,), dtype), "out:"
    if how == "dtype":
        return np.zeros(shape, np.float16), "out:"
    if how == "strided":
        out = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
        return out, (None if out.flags.c_contiguous else "out:")
    if how == "readonly":
        out = np.zeros(shape, dtype)
        out.flags.writeable = False
        return out, "out:"
    if how == "alias":  # out is a window of a float array that is also an input
        name = data.draw(st.sampled_from(sorted(inputs)), label="alias of")
        a = inputs[name]
        if not isinstance(a, np.ndarray) or a.dtype != dtype or not a.flags.c_contiguous or \
                not a.flags.writeable or a.size < n or n == 0:
            return None, None
        start = data.draw(st.integers(0, a.size - n), label="alias at")
        return a.reshape(-1)[start:start + n].reshape(shape), f"out: shares memory with {name}"
    return None, None


# ------------------------------------------------------------------------------ assign_slots
@backend_fuzz
def test_fuzz_assign_slots(be, data, request):
    backend = backend_by_name(be, request)
    T, K, E, C, _ = _sizes(data)
    idx, _, _ = _routing(data, T, K, E, C)
    order = None
    if data.draw(st.booleans(), label="token_order"):
        order = np.random.default_rng(T).permutation(T).astype(np.int64)
    num_experts, capacity = E, C
    if fuzz.maybe(data, "spoil expert_index"):
        idx = fuzz.spoil_array(data, idx, "expert_index", low=0, high=E)
    if order is not None and fuzz.maybe(data, "spoil token_order"):
        order = fuzz.spoil_array(data, order, "token_order", low=0, high=T) if T else order[:0]
        if order.ndim == 1 and order.size == T and T > 1 and data.draw(st.booleans()):
            order = np.zeros(T, np.int64)  # in range, but not a permutation
    if fuzz.maybe(data, "spoil num_experts"):
        num_experts = fuzz.bad_int(data, "num_experts", E, 1, None)
    if fuzz.maybe(data, "spoil capacity"):
        capacity = data.draw(st.sampled_from([-1, 10**9, 2.0, None]), label="capacity")
    args = [fuzz.present(data, idx, "expert_index"), fuzz.present(data, order, "token_order")]
    fuzz.check(f"{be}.assign_slots", ("expert_index", "token_order", "num_experts", "capacity"),
               lambda: backend.assign_slots(*args, num_experts, capacity),
               lambda: REF.assign_slots(*map(fuzz.canonical, args), num_experts, capacity))


# ------------------------------------------------------------------------------ dispatch
@backend_fuzz
def test_fuzz_dispatch(be, data, request):
    backend = backend_by_name(be, request)
    T, K, E, C, D = _sizes(data)
    _, _, owner = _routing(data, T, K, E, C)
    x = fuzz.float_values(data, (T, D), fuzz.float_dtype(data, "x dtype"), nonfinite=True)
    weight = None
    if data.draw(st.booleans(), label="weight"):
        weight = fuzz.float_values(data, (T, K), fuzz.float_dtype(data, "weight dtype"),
                                   nonfinite=True)
    k = K
    if fuzz.maybe(data, "spoil x"):
        x = fuzz.spoil_array(data, x, "x")
    if fuzz.maybe(data, "spoil slot_owner"):
        owner = fuzz.spoil_array(data, owner, "slot_owner", low=-1, high=T * K)
    if fuzz.maybe(data, "spoil k"):
        k = fuzz.bad_int(data, "k", K, 1, None)
    if weight is not None and fuzz.maybe(data, "spoil weight"):
        weight = fuzz.spoil_array(data, weight, "weight")
    args = [fuzz.present(data, x, "x"), fuzz.present(data, owner, "slot_owner"), k,
            fuzz.present(data, weight, "weight")]
    shape, dtype = _result_like(lambda: REF.dispatch(*map(fuzz.canonical, args)), (E, C, D),
                                args[0])
    _check_with_out(data, backend, be, "dispatch", ("x", "slot_owner", "k", "weight"), args,
                    shape, dtype, {"x": args[0], "weight": args[3]})


def _check_with_out(data, backend, be: str, op: str, names: tuple, args: list, shape, dtype,
                    inputs: dict) -> None:
    """The contract for an op that can write into out= (dispatch, combine): a clear error, or
    the reference's bits, written into out when one was given (C also draws naive=)."""
    out, reject = _out_arg(data, backend, shape, dtype, inputs)
    kw = {}
    if backend.name == "c":
        kw = {"naive": data.draw(st.booleans(), label="naive"), "out": out}
    got = fuzz.check(f"{be}.{op}", names + ("out",), lambda: getattr(backend, op)(*args, **kw),
                     lambda: getattr(REF, op)(*map(fuzz.canonical, args)),
                     backend_limit=_c_limit, must_reject=reject)
    if got is not None and out is not None:
        assert got is out


# ------------------------------------------------------------------------------ combine
@backend_fuzz
def test_fuzz_combine(be, data, request):
    backend = backend_by_name(be, request)
    T, K, E, C, D = _sizes(data)
    idx, pos, _ = _routing(data, T, K, E, C)
    eo = fuzz.float_values(data, (E, C, D), fuzz.float_dtype(data, "expert_out dtype"),
                           nonfinite=True)
    weight = None
    if data.draw(st.booleans(), label="weight"):
        weight = fuzz.float_values(data, (T, K), fuzz.float_dtype(data, "weight dtype"),
                                   nonfinite=True)
    if fuzz.maybe(data, "spoil expert_out"):
        eo = fuzz.spoil_array(data, eo, "expert_out")
    if fuzz.maybe(data, "spoil expert_index"):
        idx = fuzz.spoil_array(data, idx, "expert_index", low=0, high=E)
    if fuzz.maybe(data, "spoil position"):
        pos = fuzz.spoil_array(data, pos, "position", low=-1, high=C)
    if weight is not None and fuzz.maybe(data, "spoil weight"):
        weight = fuzz.spoil_array(data, weight, "weight")
    args = [fuzz.present(data, a, n) for a, n in ((eo, "expert_out"), (idx, "expert_index"),
                                                  (pos, "position"), (weight, "weight"))]
    shape, dtype = _result_like(lambda: REF.combine(*map(fuzz.canonical, args)), (T, D), args[0])
    _check_with_out(data, backend, be, "combine",
                    ("expert_out", "expert_index", "position", "weight"), args, shape, dtype,
                    {"expert_out": args[0], "weight": args[3]})


# ------------------------------------------------------------------------------ gate_grad
def _close_and_layout_free(backend, args, kw):
    """The C gate gradient sums each dot product in its own fixed order (and casts dy to
    expert_out's dtype first), so it matches NumPy to round-off: within (D + 2) eps of the sum of
    the absolute terms, where both are finite. It matches itself on the canonical copies bit for
    bit, whatever the caller's layout, byte order or index type."""
    canon = list(map(fuzz.canonical, args))

    def same(got, want):
        if not fuzz.same_bits(got, backend.gate_grad(*canon, **kw)):
            return False
        dy, eo, idx, pos = canon
        with np.errstate(all="ignore"):
            scale = REF.gate_grad(np.abs(dy), np.abs(eo), idx, pos).astype(np.float64)
            tol = (eo.shape[2] + 2) * np.finfo(want.dtype).eps * scale + np.finfo(want.dtype).tiny
            ok = np.isfinite(want) & np.isfinite(got) & np.isfinite(tol)
            return bool(np.all(np.abs(got.astype(np.float64) - want)[ok] <= tol[ok]))
    return same


@backend_fuzz
def test_fuzz_gate_grad(be, data, request):
    backend = backend_by_name(be, request)
    T, K, E, C, D = _sizes(data)
    idx, pos, _ = _routing(data, T, K, E, C)
    eo = fuzz.float_values(data, (E, C, D), fuzz.float_dtype(data, "expert_out dtype"),
                           nonfinite=True)
    dy = fuzz.float_values(data, (T, D), fuzz.float_dtype(data, "dy dtype"), nonfinite=True)
    if fuzz.maybe(data, "spoil dy"):
        dy = fuzz.spoil_array(data, dy, "dy")
    if fuzz.maybe(data, "spoil expert_out"):
        eo = fuzz.spoil_array(data, eo, "expert_out")
    if fuzz.maybe(data, "spoil expert_index"):
        idx = fuzz.spoil_array(data, idx, "expert_index", low=0, high=E)
    if fuzz.maybe(data, "spoil position"):
        pos = fuzz.spoil_array(data, pos, "position", low=-1, high=C)
    args = [fuzz.present(data, a, n) for a, n in ((dy, "dy"), (eo, "expert_out"),
                                                  (idx, "expert_index"), (pos, "position"))]
    kw = {"naive": data.draw(st.booleans(), label="naive")} if backend.name == "c" else {}
    same = fuzz.same_bits if backend.name == "numpy" else _close_and_layout_free(backend, args, kw)
    fuzz.check(f"{be}.gate_grad", ("dy", "expert_out", "expert_index", "position"),
               lambda: backend.gate_grad(*args, **kw),
               lambda: REF.gate_grad(*map(fuzz.canonical, args)),
               same=same, backend_limit=_c_limit)


# ------------------------------------------------------------------------------ top_k
@backend_fuzz
def test_fuzz_top_k(be, data, request):
    backend = backend_by_name(be, request)
    T, K, E, _, _ = _sizes(data)
    K = min(K, E)
    score = fuzz.float_values(data, (T, E), fuzz.float_dtype(data, "score dtype"),
                              nonfinite=fuzz.maybe(data, "nonfinite score"))
    if score.dtype.kind == "f" and score.size and data.draw(st.booleans(), label="ties"):
        score = np.round(score)  # exact ties: the lower expert wins
    bias = probs = None
    if data.draw(st.booleans(), label="bias"):
        bias = fuzz.float_values(data, (E,), fuzz.float_dtype(data, "bias dtype"),
                                 nonfinite=fuzz.maybe(data, "nonfinite bias"))
    if data.draw(st.booleans(), label="probs"):
        probs = fuzz.float_values(data, (T, E), fuzz.float_dtype(data, "probs dtype"))
    k = K
    if fuzz.maybe(data, "spoil score"):
        score = fuzz.spoil_array(data, score, "score")
    if fuzz.maybe(data, "spoil k"):
        k = fuzz.bad_int(data, "k", K, 1, E)
    if bias is not None and fuzz.maybe(data, "spoil bias"):
        bias = fuzz.spoil_array(data, bias, "bias")
    if probs is not None and fuzz.maybe(data, "spoil probs"):
        probs = fuzz.spoil_array(data, probs, "probs")
    args = [fuzz.present(data, a, n) for a, n in ((score, "score"), (bias, "bias"),
                                                  (probs, "probs"))]
    fuzz.check(f"{be}.top_k", ("score", "k", "bias", "probs"),
               lambda: backend.top_k(args[0], k, *args[1:]),
               lambda: REF.top_k(fuzz.canonical(args[0]), k, *map(fuzz.canonical, args[1:])),
               backend_limit=_c_limit)


# ------------------------------------------------------------------------------ softmax_lse
@backend_fuzz
def test_fuzz_softmax_lse(be, data, request):
    backend = backend_by_name(be, request)
    T, _, E, _, _ = _sizes(data)
    logits = fuzz.float_values(data, (T, E), fuzz.float_dtype(data, "router_logits dtype"),
                               nonfinite=fuzz.maybe(data, "nonfinite router_logits"))
    if fuzz.maybe(data, "spoil router_logits"):
        logits = fuzz.spoil_array(data, logits, "router_logits")
    arg = fuzz.present(data, logits, "router_logits")
    fuzz.check(f"{be}.softmax_lse", ("router_logits",), lambda: backend.softmax_lse(arg),
               lambda: REF.softmax_lse(fuzz.canonical(arg)), backend_limit=_c_limit)


# ------------------------------------------------------------------------------ relu epilogues
@backend_fuzz
def test_fuzz_relu_epilogues(be, data, request):
    """bias_relu / relu_backward work in place: the array as the caller handed it must be a
    writeable, C-contiguous, native float array, else a named error (a copy would be updated
    instead of it); then its new values are the reference's on a copy."""
    backend = backend_by_name(be, request)
    T, _, _, _, D = _sizes(data)
    op, name, other_name = data.draw(st.sampled_from([("bias_relu", "a", "bias"),
                                                      ("relu_backward", "grad", "hidden")]))
    a = fuzz.float_values(data, (T, D), fuzz.float_dtype(data, f"{name} dtype"), nonfinite=True)
    other = fuzz.float_values(data, (D,) if op == "bias_relu" else (T, D),
                              fuzz.float_dtype(data, f"{other_name} dtype"), nonfinite=True)
    if fuzz.maybe(data, f"spoil {name}"):
        a = fuzz.spoil_array(data, a, name)
    if fuzz.maybe(data, f"spoil {other_name}"):
        other = fuzz.spoil_array(data, other, other_name)
    a_arg, other_arg = fuzz.present(data, a, name), fuzz.present(data, other, other_name)
    in_place = isinstance(a_arg, np.ndarray) and a_arg.flags.c_contiguous and \
        a_arg.flags.writeable and a_arg.dtype.isnative

    def subject():
        getattr(backend, op)(a_arg, other_arg)
        return a_arg

    before = fuzz.canonical(a_arg)  # the subject runs first and changes a_arg

    def reference():
        getattr(REF, op)(before, fuzz.canonical(other_arg))
        return before

    fuzz.check(f"{be}.{op}", (name, other_name), subject, reference, backend_limit=_c_limit,
               must_reject=None if in_place else f"{name}:")
