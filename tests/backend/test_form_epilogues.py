"""The expert forms' epilogues: the C twins (csrc/expert_forms.h, one pass each) give
pymoe.expert_forms' bits, forward and backward, on values with zeros of both signs, NaN, inf,
the clamp limits themselves and values far past exp's range; and the deterministic exp is the
same in both (its constants are read from the C source)."""
import os
import re

import numpy as np
import pytest

from props import given, st
from pymoe.backend import NumpyBackend
from pymoe.expert_forms import EXP_F32, EXP_F64, EXPERT_FORMS, form_spec

REF = NumpyBackend()
FORMS = [n for n, f in EXPERT_FORMS.items() if f.forward is not None]
ARGS = {"swiglu_oai": [(7.0, 1.702), (0.5, 3.0)], "swiglu_clamped": [(10.0,), (0.75,)],
        "swiglu_clamp_after": [(float("inf"),), (0.5,)], "swiglu_softcap": [(4.0, 25.0), (0.3, 2.0)]}


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal bits, signed zeros included; a NaN's payload may differ."""
    nan = np.isnan(want)
    return bool((np.isnan(got) == nan).all()) and got[~nan].tobytes() == want[~nan].tobytes()


@st.composite
def cases(draw):
    form = draw(st.sampled_from(FORMS))
    args = draw(st.sampled_from(ARGS.get(form, [()])))
    rows, H = draw(st.integers(0, 7)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    W = 2 * H if EXPERT_FORMS[form].gated else H
    scale = draw(st.sampled_from([1.0, 4.0, 100.0, 1000.0]))
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, 88.7, -88.7, 709.0, -745.0,
                        -103.0, -740.0, 710.0, -746.0,  # exp's subnormal and overflow ends
                        *[v for v in args if np.isfinite(v)], *[-v for v in args if np.isfinite(v)]])

    def pick(shape):
        a = rng.normal(size=shape) * scale
        return np.where(rng.random(shape) < 0.15, rng.choice(special, size=shape), a).astype(dtype)
    return form, args, pick((rows, W)), pick((rows, H))


@given(cases())
def test_c_form_epilogues_are_the_numpy_bits(c_backend, case):
    form, args, a, dh = case
    rows, W = a.shape
    H = dh.shape[1]
    with np.errstate(all="ignore"):
        want, got = np.empty((rows, H), a.dtype), np.full((rows, H), 7, a.dtype)
        REF.form_forward(form, a, want, *args)
        c_backend.form_forward(form, a, got, *args)
        assert same_bits(got, want), form
        want, got = np.empty((rows, W), a.dtype), np.full((rows, W), 7, a.dtype)
        REF.form_backward(form, dh, a, want, *args)
        c_backend.form_backward(form, dh, a, got, *args)
    assert same_bits(got, want), form


@given(cases())
def test_c_bias_form_is_the_bias_add_then_the_form(c_backend, case):
    """form_forward(..., bias=b): a += b and the form in one pass, the two NumPy steps' bits."""
    form, args, a, _ = case
    rows, W = a.shape
    H = W // 2 if EXPERT_FORMS[form].gated else W
    b = np.random.default_rng(rows * 31 + W).normal(size=W).astype(a.dtype)
    b[: min(W, 3)] = np.array([-0.0, np.inf, np.nan], a.dtype)[: min(W, 3)]
    with np.errstate(all="ignore"):
        a_ref, a_np, a_c = a.copy(), a.copy(), a.copy()
        want = np.empty((rows, H), a.dtype)
        a_ref += b
        REF.form_forward(form, a_ref, want, *args)
        got_np, got_c = np.full_like(want, 7), np.full_like(want, 7)
        REF.form_forward(form, a_np, got_np, *args, bias=b)
        c_backend.form_forward(form, a_c, got_c, *args, bias=b)
    for got, a_after in ((got_np, a_np), (got_c, a_c)):
        assert same_bits(got, want) and same_bits(a_after, a_ref), form


@pytest.mark.parametrize("who", ["numpy", "c"])
def test_bias_form_arguments_are_named(c_backend, who):
    be = REF if who == "numpy" else c_backend
    a, out = np.zeros((3, 8)), np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"bias: expected shape \[8\], got \(4,\)"):
        be.form_forward("swiglu", a, out, bias=np.zeros(4))
    with pytest.raises(ValueError, match="a: expected a C-contiguous, writeable array"):
        be.form_forward("swiglu", np.zeros((8, 3)).T, out, bias=np.zeros(8))
    with pytest.raises(TypeError, match="a: expected a numpy array"):
        be.form_forward("swiglu", a.tolist(), out, bias=np.zeros(8))
    buf = np.zeros(20)
    with pytest.raises(ValueError, match="out: shares memory with bias"):
        be.form_forward("swiglu", a, buf[:12].reshape(3, 4), bias=buf[4:12])
    assert not a.any()  # nothing was written before the checks failed


def _c_constants(suffix: str) -> dict[str, list[float]]:
    src = open(os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "expert_forms.h")).read()
    part = src.split("#ifdef PYMOE_F32", 1)[1].split("#else", 1)
    text = part[0] if suffix == "f32" else part[1].split("#endif", 1)[0]
    hexes = re.findall(r"(\w+)\s*=\s*(-?0x[0-9a-f.]+p[+-]\d+)", text)
    coef = re.search(r"EXP_COEF\[\]\s*=\s*\{([^}]*)\}", text).group(1)
    out = {k[4:].lower(): [float.fromhex(v)] for k, v in hexes}
    out["coef"] = [float.fromhex(c.strip().rstrip("f")) for c in coef.split(",")]
    return out


@pytest.mark.parametrize("spec, suffix", [(EXP_F64, "f64"), (EXP_F32, "f32")])
def test_exp_constants_are_the_c_ones(spec, suffix):
    c = _c_constants(suffix)
    for k, v in spec.items():
        want = [float.fromhex(x) for x in v] if k == "coef" else [float.fromhex(v)]
        assert c[k] == want, k


@pytest.mark.parametrize("who", ["numpy", "c"])
def test_form_epilogue_arguments_are_named(c_backend, who):
    be = REF if who == "numpy" else c_backend
    a, out = np.zeros((3, 8)), np.zeros((3, 4))
    with pytest.raises(ValueError, match="form: expected one of"):
        be.form_forward("tanh", a, out)
    with pytest.raises(ValueError, match="form: expected one of"):
        be.form_forward("relu", a, out)  # relu keeps bias_relu / relu_backward
    with pytest.raises(ValueError, match="out: expected shape"):
        be.form_forward("swiglu", a, np.zeros((3, 8)))
    with pytest.raises(ValueError, match="a: the gated form 'swiglu'"):
        be.form_forward("swiglu", np.zeros((3, 7)), out)
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        be.form_forward("gelu", np.zeros((4, 3)), np.zeros((3, 4)).T)
    with pytest.raises(ValueError, match="out: shares memory with a"):
        be.form_backward("gelu", out, out, out)
    with pytest.raises(ValueError, match="dh"):
        be.form_backward("swiglu", np.zeros((3, 5)), a, np.zeros((3, 8)))
    with pytest.raises(TypeError, match="args: the form 'swiglu_oai' takes 2"):
        be.form_forward("swiglu_oai", a, out, 7.0)
    with pytest.raises(TypeError, match=r"args\[0\]: expected a real number"):
        be.form_forward("swiglu_clamped", a, out, float("nan"))
    with pytest.raises(TypeError, match="out: expected a numpy array"):
        be.form_forward("swiglu", a, [[0.0]])
    if who == "c":
        with pytest.raises(TypeError, match="a: the C backend takes float32 or float64"):
            be.form_forward("swiglu", a.astype(np.float16), out.astype(np.float16))


def test_form_spec_defaults():
    assert form_spec("swiglu_oai").args == (7.0, 1.702)
    assert form_spec("swiglu_oai", swiglu_limit=3.0).args == (3.0, 1.702)
    assert form_spec("swiglu_softcap").args == (4.0, 25.0)
    assert form_spec("swiglu").args == ()
