"""The expert forms (pymoe.expert_forms) and the layer extras, in float64 against central finite
differences, against plain loops written independently with math.exp / math.tanh, across the two
formulations and the two backends, and with their named errors."""
import math
import pickle

import numpy as np
import pytest

import pymoe
from helpers import (
    FD_RTOL,
    check_group_gradients,
    check_layer_gradients,
    numerical_grad,
    randomize,
    rel_error,
)
from pymoe.expert_forms import _EXP, EXPERT_FORMS, exp, form_spec

FORMS = list(EXPERT_FORMS)
GATED = [n for n, f in EXPERT_FORMS.items() if f.gated]
# small limits and caps, so that every clamp and cap is active on part of the values
TIGHT = {"swiglu_oai": dict(swiglu_limit=0.9, swiglu_alpha=1.702),
         "swiglu_clamped": dict(swiglu_limit=0.8), "swiglu_clamp_after": dict(swiglu_limit=0.3),
         "swiglu_softcap": dict(swiglu_softcap=(0.7, 1.5))}
LOOP_TOL = dict(rtol=1e-12, atol=1e-13)  # float64 loops with libm's exp vs the det. exp: ~1 ulp


# ------------------------------------------------------------------ exp
def _ulps(got: np.ndarray, want: np.ndarray) -> int:
    it = np.int64 if got.dtype == np.float64 else np.int32
    return int(np.abs(got.view(it).astype(np.int64) - want.view(it).astype(np.int64)).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp_is_within_one_ulp_of_numpys(dtype):
    """The docstring's measurement, on 2e5 points: max ulp 1 against np.exp (float64) and the
    correctly rounded float64 exp (float32); held to 2 here, as np.exp itself is ~1 ulp."""
    rng = np.random.default_rng(0)
    fi = np.finfo(dtype)
    for lo, hi in ((math.log(fi.tiny), math.log(fi.max)), (-1.0, 1.0)):
        x = rng.uniform(lo, hi, 200_000).astype(dtype)
        want = np.exp(x.astype(np.float64)).astype(dtype)
        assert _ulps(exp(x), want) <= 2


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp_edges(dtype):
    c = _EXP[np.dtype(dtype)]
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, c["lo"], c["hi"], -1e4, 1e4], dtype)
    got = exp(x)
    assert got.dtype == dtype
    assert got[0] == 1 and got[1] == 1 and got[2] == np.inf and got[3] == 0
    assert np.isnan(got[4]) and got[5] == 0 and got[6] == np.inf and got[7] == 0
    assert got[8] == np.inf
    tiny = np.array([-745.0 if dtype == np.float64 else -103.0], dtype)
    assert 0 < exp(tiny)[0] < np.finfo(dtype).tiny  # a subnormal, correctly scaled


# ------------------------------------------------------------------ elementwise, float64
def _oracle_h(name: str, a: np.ndarray, args: tuple) -> np.ndarray:
    """Each form by its formula, element by element with math.exp / math.tanh."""
    sig = lambda z: 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0  # noqa: E731
    gelu = lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    gated = EXPERT_FORMS[name].gated
    H = a.shape[1] // 2 if gated else a.shape[1]
    h = np.zeros((a.shape[0], H))
    for i in range(a.shape[0]):
        for j in range(H):
            g = float(a[i, j])
            u = float(a[i, H + j]) if gated else 0.0
            if name == "relu":
                v = max(g, 0.0)
            elif name == "gelu":
                v = gelu(g)
            elif name == "relu2":
                v = max(g, 0.0) ** 2
            elif name == "silu":
                v = g * sig(g)
            elif name == "swiglu":
                v = g * sig(g) * u
            elif name == "geglu":
                v = gelu(g) * u
            elif name == "swiglu_oai":
                L, al = args
                gc, uc = min(g, L), min(max(u, -L), L)
                v = (uc + 1) * gc * sig(al * gc)
            elif name == "swiglu_clamped":
                (L,) = args
                gc, uc = min(g, L), min(max(u, -L), L)
                v = gc * sig(gc) * uc
            elif name == "swiglu_clamp_after":
                (L,) = args
                v = min(g * sig(g), L) * min(max(u, -L), L)
            else:
                cg, cu = args
                v = cg * math.tanh(g / cg) * sig(g) * cu * math.tanh(u / cu)
            h[i, j] = v
    return h


def _h(spec, a):
    if spec.name == "relu":
        return np.maximum(a, 0)
    out = np.empty((a.shape[0], a.shape[1] // (2 if spec.gated else 1)))
    spec.forward(a, out)
    return out


@pytest.mark.parametrize("name", FORMS)
def test_each_form_is_its_formula(name):
    rng = np.random.default_rng(1)
    spec = form_spec(name, **TIGHT.get(name, {}))
    a = rng.normal(size=(6, 10)) * 2
    np.testing.assert_allclose(_h(spec, a), _oracle_h(name, a, spec.args), **LOOP_TOL)
    default = form_spec(name)
    np.testing.assert_allclose(_h(default, a * 5), _oracle_h(name, a * 5, default.args),
                               **LOOP_TOL)


@pytest.mark.parametrize("name", [n for n in FORMS if n != "relu"])
def test_each_form_gradient_matches_finite_differences(name):
    rng = np.random.default_rng(2)
    spec = form_spec(name, **TIGHT.get(name, {}))
    a = rng.normal(size=(4, 8)) * 1.5
    H = 4 if spec.gated else 8
    dh = rng.normal(size=(4, H))
    da = np.empty_like(a)
    spec.backward(dh, a, da)
    fd = numerical_grad(lambda: float(np.sum(_h(spec, a) * dh)), a)
    assert rel_error(da, fd) <= FD_RTOL


def test_clamp_masks_pass_the_gradient_at_the_bounds_as_torch():
    """torch.clamp passes the gradient where min <= x <= max, bounds included."""
    L = 1.0
    a = np.array([[L, 2.0, L, -L]])  # g = L (passes), 2 (cut); u = L, -L (both pass)
    da = np.empty_like(a)
    form_spec("swiglu_clamped", swiglu_limit=L).backward(np.ones((1, 2)), a, da)
    assert da[0, 0] != 0 and da[0, 1] == 0 and da[0, 2] != 0 and da[0, 3] != 0


def test_clamp_after_zero_means_no_clamp():
    assert form_spec("swiglu_clamp_after", swiglu_limit=0.0).args == (math.inf,)
    assert form_spec("swiglu_clamp_after").args == (math.inf,)


def test_float16_forms_compute_in_float32():
    a = np.random.default_rng(3).normal(size=(3, 8)).astype(np.float16)
    out = np.empty((3, 4), np.float16)
    form_spec("swiglu").forward(a, out)
    want = np.empty((3, 4), np.float32)
    form_spec("swiglu").forward(a.astype(np.float32), want)
    np.testing.assert_array_equal(out, want.astype(np.float16))


# ------------------------------------------------------------------ the layer
def _layer(name, formulation="indexed", backend="numpy", dtype=np.float64, **kw):
    layer = pymoe.MoELayer(4, 5, 4, 2, kw.pop("cf", 0.75), activation=name, aux_loss_coef=0.2,
                           z_loss_coef=0.05, formulation=formulation, backend=backend,
                           dtype=dtype, seed=0, **{**TIGHT.get(name, {}), **kw})
    randomize(layer, seed=11)
    return layer


def _oracle_layer(layer, x):
    """y [T, D] token by token, expert by expert, with the forms' loops above, from the layer's
    own routing (the routing has its own oracles) and every extra written out."""
    p = {n: v.astype(np.float64) for n, v in layer.params.items()}
    r = layer.routing
    name, args = layer.expert_form.name, layer.expert_form.args
    y = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(r.expert_index.shape[1]):
            if r.position[t, j] < 0:
                continue
            e, g = r.expert_index[t, j], float(r.gate[t, j])
            xin = g * x[t] if layer.gate_input else x[t]
            h = _oracle_h(name, (xin @ p["w1"][e] + p["b1"][e])[None], args)[0]
            out = h @ p["w2"][e] + p["b2"][e]
            y[t] += out if layer.gate_input else g * out
        if layer.num_shared_experts:
            sname, sargs = layer.shared_form.name, layer.shared_form.args
            ys = sum(_oracle_h(sname, (x[t] @ p["shared_w1"][s] + p["shared_b1"][s])[None],
                               sargs)[0] @ p["shared_w2"][s] + p["shared_b2"][s]
                     for s in range(layer.num_shared_experts))
            if layer.shared_expert_gate:
                ys = ys / (1 + math.exp(-float(x[t] @ p["w_shared_gate"])))
            y[t] = (y[t] + ys) / 2 if layer.shared_combine == "mean" else y[t] + ys
        if layer.output_bias:
            y[t] += p["b_out"]
        if layer.post_norm:
            y[t] = p["post_norm_weight"] * y[t] / math.sqrt(np.mean(y[t] ** 2) + layer.post_norm_eps)
    return y


EXTRAS = {
    "shared": dict(num_shared_experts=2, shared_d_hidden=3),
    "shared_gated_mean": dict(num_shared_experts=1, shared_d_hidden=7, shared_expert_gate=True,
                              shared_combine="mean"),
    "gate_input": dict(gate_input=True),
    "output_bias": dict(output_bias=True),
    "post_norm": dict(post_norm=True, post_norm_eps=1e-3),
    "all": dict(num_shared_experts=1, shared_d_hidden=3, output_bias=True, post_norm=True,
                gate_input=True),
}


@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_layer_of_each_form_matches_loops_and_finite_differences(name, formulation):
    layer = _layer(name, formulation, num_shared_experts=1, shared_d_hidden=3)
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    y = layer.forward(x)
    assert layer.routing.dropped_fraction > 0
    W = 10 if EXPERT_FORMS[name].gated else 5
    assert layer.params["w1"].shape == (4, 4, W) and layer.params["w2"].shape == (4, 5, 4)
    assert layer.params["shared_w1"].shape[2] == (6 if EXPERT_FORMS[name].gated else 3)
    np.testing.assert_allclose(y, _oracle_layer(layer, x), **LOOP_TOL)
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) <= FD_RTOL, errors


@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("name", ["swiglu", "swiglu_oai", "relu"])
@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_layer_extras_match_loops_and_finite_differences(extra, name, formulation):
    layer = _layer(name, formulation, **EXTRAS[extra])
    rng = np.random.default_rng(6)
    x, dy = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    np.testing.assert_allclose(layer.forward(x), _oracle_layer(layer, x), **LOOP_TOL)
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) <= FD_RTOL, errors


def test_step3p7_shared_limit_is_its_own():
    layer = _layer("swiglu_clamp_after", num_shared_experts=1, swiglu_limit=0.3,
                   shared_swiglu_limit=0.0)
    assert layer.expert_form.args == (0.3,) and layer.shared_form.args == (math.inf,)
    rng = np.random.default_rng(7)
    x, dy = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    np.testing.assert_allclose(layer.forward(x), _oracle_layer(layer, x), **LOOP_TOL)
    assert max(check_layer_gradients(layer, x, dy).values()) <= FD_RTOL


@pytest.mark.parametrize("name", FORMS)
def test_dense_and_indexed_formulations_agree(name):
    """Different matmul shapes (filled rows vs all C slots): equal to float64 round-off."""
    rng = np.random.default_rng(8)
    x, dy = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
    kw = dict(num_shared_experts=1, output_bias=True, post_norm=True, gate_input=True)
    a, b = _layer(name, "indexed", **kw), _layer(name, "dense", **kw)
    np.testing.assert_allclose(a.forward(x), b.forward(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.backward(dy), b.backward(dy), rtol=1e-12, atol=1e-12)
    for n in a.grads:
        np.testing.assert_allclose(a.grads[n], b.grads[n], rtol=1e-12, atol=1e-12, err_msg=n)


@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_c_and_numpy_layers_agree(c_backend, name, dtype):
    """Same matmul shapes on one machine, bit-equal epilogues, dispatch and combine: the same
    output and expert gradients bit for bit; dx and the router's gradient pass through the C gate
    gradient, whose dot products sum in another order (round-off)."""
    rng = np.random.default_rng(9)
    x, dy = rng.normal(size=(16, 4)).astype(dtype), rng.normal(size=(16, 4)).astype(dtype)
    a, b = _layer(name, backend="numpy", dtype=dtype), _layer(name, backend="c", dtype=dtype)
    b.params = {n: p.copy() for n, p in a.params.items()}
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    dxa, dxb = a.backward(dy), b.backward(dy)
    for n in ("w1", "b1", "w2", "b2"):
        np.testing.assert_array_equal(a.grads[n], b.grads[n], err_msg=n)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dxa, dxb, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["swiglu", "swiglu_oai", "relu2"])
def test_token_groups_run_the_forms(name):
    """G = 2 groups: parameters get the gradient of J = (1/G) sum_g L_g, x that of L_g
    (test_token_groups' objective)."""
    layer = _layer(name, token_groups=2, cf=1.0)
    rng = np.random.default_rng(10)
    check_group_gradients(layer, rng.normal(size=(12, 4)), rng.normal(size=(12, 4)))


def test_layer_with_forms_and_extras_pickles():
    layer = _layer("swiglu_softcap", num_shared_experts=1, shared_d_hidden=3, output_bias=True,
                   post_norm=True)
    x = np.random.default_rng(11).normal(size=(8, 4))
    again = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(again.forward(x), layer.forward(x))
    assert again.expert_form == layer.expert_form and "b_out" in again.params


@pytest.mark.parametrize("kw, err, match", [
    (dict(activation="swish"), ValueError, "activation: expected one of"),
    (dict(activation="swiglu", swiglu_limit=7.0), ValueError, "swiglu_limit: the form"),
    (dict(activation="swiglu_clamped", swiglu_alpha=1.0), ValueError, "swiglu_alpha: the form"),
    (dict(activation="swiglu_oai", swiglu_softcap=(1.0, 2.0)), ValueError, "swiglu_softcap:"),
    (dict(activation="swiglu_oai", swiglu_limit=-1.0), ValueError, "swiglu_limit: expected a"),
    (dict(activation="swiglu_oai", swiglu_limit=float("inf")), ValueError, "swiglu_limit"),
    (dict(activation="swiglu_oai", swiglu_limit=0.0), ValueError, "swiglu_limit: expected a"),
    (dict(activation="swiglu_oai", swiglu_limit="7"), TypeError, "swiglu_limit"),
    (dict(activation="swiglu_oai", swiglu_alpha=float("nan")), ValueError, "swiglu_alpha"),
    (dict(activation="swiglu_softcap", swiglu_softcap=4.0), TypeError, "swiglu_softcap: expected a pair"),
    (dict(activation="swiglu_softcap", swiglu_softcap=(4.0, 0.0)), ValueError, r"swiglu_softcap\[1\]"),
    (dict(shared_d_hidden=3), ValueError, "shared_d_hidden: needs num_shared_experts"),
    (dict(num_shared_experts=1, shared_d_hidden=0), ValueError, "shared_d_hidden"),
    (dict(shared_combine="mean"), ValueError, "shared_combine: needs num_shared_experts"),
    (dict(num_shared_experts=1, shared_combine="average"), ValueError, "shared_combine: expected"),
    (dict(num_shared_experts=1, shared_swiglu_limit=3.0), ValueError, "shared_swiglu_limit"),
    (dict(shared_sum_fp32=True), ValueError, "shared_sum_fp32: needs"),
    (dict(gate_input=1), TypeError, "gate_input: expected a bool"),
    (dict(output_bias="yes"), TypeError, "output_bias: expected a bool"),
    (dict(post_norm=True, post_norm_eps=0.0), ValueError, "post_norm_eps"),
    (dict(post_norm=True, token_groups=2), ValueError, "post_norm: not supported with"),
    (dict(gate_input=True, token_groups=2), ValueError, "gate_input: not supported with"),
])
def test_bad_form_keywords_are_named(kw, err, match):
    with pytest.raises(err, match=match):
        pymoe.MoELayer(4, 5, 4, 2, **kw)


def test_float16_shared_sum_in_float32():
    """hy_v3's fp32 combine: for two terms NumPy's float16 add already rounds the exact sum once,
    so the bits agree with the plain sum; the keyword is there for the loader's bookkeeping."""
    kw = dict(num_shared_experts=1, dtype=np.float16)
    a = pymoe.MoELayer(4, 5, 4, 2, activation="swiglu", **kw)
    b = pymoe.MoELayer(4, 5, 4, 2, activation="swiglu", shared_sum_fp32=True, **kw)
    x = np.random.default_rng(12).normal(size=(8, 4)).astype(np.float16)
    ya, yb = a.forward(x), b.forward(x)
    assert yb.dtype == np.float16
    np.testing.assert_array_equal(ya, yb)
