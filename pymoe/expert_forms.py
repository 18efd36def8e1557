"""Step 11b's elementwise middle: the expert forms of real MoE models, one table of them.

An expert is FFN(x) = form(x @ w1 + b1) @ w2 + b2. A plain form maps a = x @ w1 + b1 `[n, H]` to
h `[n, H]`; a gated one (a GLU, Shazeer 2020) reads a `[n, 2H]` = [gate | up], the gate columns
first (HF's gate_up_proj `[E, 2H, D]` transposed, in its chunk(2) order), and gives h `[n, H]`:
the first layer stays one matmul, and one pass here turns its output into h. Each form is a pair:
form(a, out, *args) writes h into out; form_backward(dh, a, out, *args) writes da (a's shape)
into out, from the forward's a (it recomputes what it needs: a is the only activation kept).

The transcendental functions rest on one exp, `exp` below, written from IEEE-exact operations
only, so that NumPy and the C epilogues (csrc/expert_forms.h, the same operations in the same
order) give the same bits on every machine; np.exp cannot be that reference (its SIMD loops
differ from libm and between CPUs and NumPy versions). sigmoid(x) = 1 / (1 + exp(-x)),
silu(x) = x / (1 + exp(-x)), tanh(z) = 2 sigmoid(2z) - 1, gelu_tanh(a) = a sigmoid(2c (a +
0.044715 a^3)). float16 arrays are computed in float32 and rounded once into out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

# ------------------------------------------------------------------ the deterministic exp
# Cody-Waite: n = rint(x log2 e) by the 1.5 * 2^p shifter (an exact add and subtract), r = x -
# n ln2_hi - n ln2_lo (ln2_hi has trailing zero bits, so n * ln2_hi is exact for the n that
# occur), exp(r) by the Taylor polynomial in Horner form on |r| <= ln2 / 2, then ldexp(p, n),
# which rounds once (also into the subnormals). x is first clamped to [lo, hi], past which exp
# is 0 / inf anyway; NaN passes through without reaching the integer conversion.
# Measured against np.exp over 2e6 points of [lo, hi] and 2e6 of [-1, 1]: at most 1 ulp in
# float64 and 1 ulp in float32 (tests/recipe/test_expert_forms.py holds it to 2).
# The C twin (csrc/expert_forms.h, det_exp) uses the same hex constants: a test reads them there.
EXP_F64 = dict(lo="-0x1.75p+9", hi="0x1.63p+9", log2e="0x1.71547652b82fep+0",
               shift="0x1.8p+52", ln2_hi="0x1.62e42feep-1", ln2_lo="0x1.a39ef35793c76p-33",
               coef=[float(1 / math.factorial(k)).hex() for k in range(14)])  # degree 13
EXP_F32 = dict(lo="-0x1.ap+6", hi="0x1.64p+6", log2e="0x1.715476p+0", shift="0x1.8p+23",
               ln2_hi="0x1.62e4p-1", ln2_lo="0x1.7f7d1cp-20",
               coef=[float(np.float32(1 / math.factorial(k))).hex() for k in range(8)])  # deg. 7


def _consts(spec: dict, dt: type) -> dict:
    return {k: ([dt(float.fromhex(c)) for c in v] if k == "coef" else dt(float.fromhex(v)))
            for k, v in spec.items()}


_EXP = {np.dtype(np.float64): _consts(EXP_F64, np.float64),
        np.dtype(np.float32): _consts(EXP_F32, np.float32)}


def exp(x: np.ndarray) -> np.ndarray:
    """e^x for a float32 or float64 array, the same bits as the C epilogues' det_exp.

    Within 1 ulp of the correctly rounded value over the normal range (measured; see above);
    exp(-inf) = 0, exp(inf) = inf, exp(NaN) = NaN; subnormal results are correctly scaled.
    """
    c = _EXP[x.dtype]
    nan = np.isnan(x)
    xc = np.clip(np.where(nan, c["lo"] * 0, x), c["lo"], c["hi"])  # NaN -> 0 here, back below
    n = (xc * c["log2e"] + c["shift"]) - c["shift"]  # rint(x / ln2), exactly
    r = (xc - n * c["ln2_hi"]) - n * c["ln2_lo"]  # |r| <= ln2 / 2
    coef = c["coef"]
    p = np.full_like(r, coef[-1])
    for ck in coef[-2::-1]:  # p = p * r + ck, in place (the same two roundings)
        p *= r
        p += ck
    with np.errstate(over="ignore", under="ignore"):  # inf and 0 are the answers there
        out = np.ldexp(p, n.astype(np.int32))
    return np.where(nan, x, out)


# ------------------------------------------------------------------ elementwise pieces
# Every expression below is written operation by operation as csrc/expert_forms.h writes it:
# the same order, the same constants rounded to the array's dtype.

def _work(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _halves(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    H = a.shape[-1] // 2
    return a[..., :H], a[..., H:]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + exp(-x))


def _tanh(z: np.ndarray) -> np.ndarray:
    """2 sigmoid(2z) - 1: absolute error ~1 ulp of 1 (relative error grows as |z| -> 0)."""
    return 2 / (1 + exp(-(z + z))) - 1


_GELU_2C = math.sqrt(2.0 / math.pi) * 2  # gelu_tanh(a) = a sigmoid(2c (a + 0.044715 a^3))
_GELU_A = 0.044715


def _gelu_parts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gelu_tanh(a), gelu_tanh'(a))."""
    t = a.dtype.type
    k = t(_GELU_2C) * (a + t(_GELU_A) * (a * a * a))
    s = _sigmoid(k)
    d = s + a * s * (1 - s) * (t(_GELU_2C) * (1 + t(3 * _GELU_A) * (a * a)))
    return a * s, d


def _silu_parts(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(silu(g), silu'(g)) = (g / (1 + e^-g), s (1 + g (1 - s))) with s = sigmoid(g)."""
    den = 1 + exp(-g)
    s = 1 / den
    return g / den, s * (1 + g * (1 - s))


def _clip_mask(u: np.ndarray, lim: np.floating) -> tuple[np.ndarray, np.ndarray]:
    """(clip(u, -L, L), 1.0 where -L <= u <= L else 0.0): torch.clamp's value and its gradient
    mask (it passes the gradient at the bounds too)."""
    return np.clip(u, -lim, lim), ((u >= -lim) & (u <= lim)).astype(u.dtype)


# ------------------------------------------------------------------ the forms
def gelu(a: np.ndarray, out: np.ndarray) -> None:
    """h = gelu_tanh(a) (GPT-2, Switch), non-gated."""
    a = _work(a)
    out[...] = _gelu_parts(a)[0]


def gelu_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    a, dh = _work(a), _work(dh)
    out[...] = dh * _gelu_parts(a)[1]


def relu2(a: np.ndarray, out: np.ndarray) -> None:
    """h = relu(a)^2 (squared ReLU, So et al. 2021; nemotron_h), non-gated; relu(-0) = +0."""
    a = _work(a)
    r = np.maximum(a, 0) + 0
    out[...] = r * r


def relu2_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    a, dh = _work(a), _work(dh)
    r = np.maximum(a, 0) + 0
    out[...] = dh * (r + r)


def silu(a: np.ndarray, out: np.ndarray) -> None:
    """h = silu(a) = a / (1 + e^-a), non-gated (Doge's single-neuron experts, H = 1)."""
    out[...] = _silu_parts(_work(a))[0]


def silu_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    a, dh = _work(a), _work(dh)
    out[...] = dh * _silu_parts(a)[1]


def swiglu(a: np.ndarray, out: np.ndarray) -> None:
    """h = silu(g) * u."""
    g, u = _halves(_work(a))
    out[...] = _silu_parts(g)[0] * u


def swiglu_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    (g, u), dh = _halves(_work(a)), _work(dh)
    silu, dsilu = _silu_parts(g)
    go, uo = _halves(out)
    go[...] = dh * u * dsilu
    uo[...] = dh * silu


def geglu(a: np.ndarray, out: np.ndarray) -> None:
    """h = gelu_tanh(g) * u."""
    g, u = _halves(_work(a))
    out[...] = _gelu_parts(g)[0] * u


def geglu_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    (g, u), dh = _halves(_work(a)), _work(dh)
    act, dact = _gelu_parts(g)
    go, uo = _halves(out)
    go[...] = dh * u * dact
    uo[...] = dh * act


def swiglu_oai(a: np.ndarray, out: np.ndarray, limit: float, alpha: float) -> None:
    """gpt-oss: g = min(g, L), u = clip(u, -L, L), h = (u + 1) * (g * sigmoid(g * alpha))."""
    g, u = _halves(_work(a))
    t = g.dtype.type
    L = t(limit)
    gc = np.minimum(g, L)
    uc = np.clip(u, -L, L)
    out[...] = (uc + 1) * (gc * _sigmoid(gc * t(alpha)))


def swiglu_oai_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray, limit: float,
                        alpha: float) -> None:
    (g, u), dh = _halves(_work(a)), _work(dh)
    t = g.dtype.type
    L, al = t(limit), t(alpha)
    gc = np.minimum(g, L)
    uc, mu = _clip_mask(u, L)
    s = _sigmoid(gc * al)
    glu = gc * s
    dglu = s + gc * al * s * (1 - s)
    go, uo = _halves(out)
    go[...] = dh * (uc + 1) * dglu * (g <= L).astype(g.dtype)
    uo[...] = dh * glu * mu


def swiglu_clamped(a: np.ndarray, out: np.ndarray, limit: float) -> None:
    """h = silu(min(g, L)) * clip(u, -L, L) (hy_v4 and the DeepSeek-V4 family)."""
    g, u = _halves(_work(a))
    L = g.dtype.type(limit)
    out[...] = _silu_parts(np.minimum(g, L))[0] * np.clip(u, -L, L)


def swiglu_clamped_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray, limit: float) -> None:
    (g, u), dh = _halves(_work(a)), _work(dh)
    L = g.dtype.type(limit)
    silu, dsilu = _silu_parts(np.minimum(g, L))
    uc, mu = _clip_mask(u, L)
    go, uo = _halves(out)
    go[...] = dh * uc * dsilu * (g <= L).astype(g.dtype)
    uo[...] = dh * silu * mu


def swiglu_clamp_after(a: np.ndarray, out: np.ndarray, limit: float) -> None:
    """step3p7: h = min(silu(g), L) * clip(u, -L, L); L = inf clamps nothing."""
    g, u = _halves(_work(a))
    L = g.dtype.type(limit)
    out[...] = np.minimum(_silu_parts(g)[0], L) * np.clip(u, -L, L)


def swiglu_clamp_after_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray,
                                limit: float) -> None:
    (g, u), dh = _halves(_work(a)), _work(dh)
    L = g.dtype.type(limit)
    silu, dsilu = _silu_parts(g)
    uc, mu = _clip_mask(u, L)
    go, uo = _halves(out)
    go[...] = dh * uc * dsilu * (silu <= L).astype(g.dtype)
    uo[...] = dh * np.minimum(silu, L) * mu


def swiglu_softcap(a: np.ndarray, out: np.ndarray, gate_cap: float, up_cap: float) -> None:
    """inkling2: h = (tanh(g / c_g) * c_g) * sigmoid(g) * (tanh(u / c_u) * c_u)."""
    g, u = _halves(_work(a))
    t = g.dtype.type
    cg, cu = t(gate_cap), t(up_cap)
    out[...] = _tanh(g / cg) * cg * _sigmoid(g) * (_tanh(u / cu) * cu)


def swiglu_softcap_backward(dh: np.ndarray, a: np.ndarray, out: np.ndarray, gate_cap: float,
                            up_cap: float) -> None:
    (g, u), dh = _halves(_work(a)), _work(dh)
    t = g.dtype.type
    cg, cu = t(gate_cap), t(up_cap)
    tg, tu = _tanh(g / cg), _tanh(u / cu)
    s = _sigmoid(g)
    sg, su = tg * cg, tu * cu
    go, uo = _halves(out)
    go[...] = dh * su * ((1 - tg * tg) * s + sg * s * (1 - s))
    uo[...] = dh * (sg * s) * (1 - tu * tu)


# ------------------------------------------------------------------ the table
Fwd = Callable[..., None]


@dataclass(frozen=True)
class ExpertForm:
    """One entry of EXPERT_FORMS.

    name: the `activation` keyword's value; gated: whether a is [gate | up] `[n, 2H]`;
    forward(a, out, *args) / backward(dh, a, out, *args): the NumPy pair (None for relu, which
    keeps its own in pymoe.experts); keywords: the ExpertOptions keywords it reads, in the order
    of args; defaults: their values when None is given; families: the HF transformers 5.24
    families that use it, and the file that defines it.
    """
    name: str
    gated: bool
    forward: Fwd | None
    backward: Fwd | None
    keywords: tuple[str, ...]
    defaults: tuple
    formula: str
    families: str


EXPERT_FORMS: dict[str, ExpertForm] = {f.name: f for f in (
    ExpertForm("relu", False, None, None, (), (), "h = max(a, 0)",
               "the original Transformer FFN; pymoe's default (switch_transformers uses relu)"),
    ExpertForm("gelu", False, gelu, gelu_backward, (), (), "h = gelu_tanh(a)",
               "GPT-2-style two-layer experts (nllb_moe, ...)"),
    ExpertForm("relu2", False, relu2, relu2_backward, (), (), "h = relu(a)^2",
               "nemotron_h (models/nemotron_h)"),
    ExpertForm("silu", False, silu, silu_backward, (), (), "h = silu(a)",
               "doge's single-neuron retrieval experts (H = 1: act(x . d_e) u_e; models/doge "
               "DogeCDMoE)"),
    ExpertForm("swiglu", True, swiglu, swiglu_backward, (), (), "h = silu(g) * u",
               "59 families: mixtral, qwen2_moe/qwen3_moe/..., deepseek_v2/v3, olmoe, dbrx, "
               "llama4, ... (act_fn(gate) * up with hidden_act='silu')"),
    ExpertForm("geglu", True, geglu, geglu_backward, (), (), "h = gelu_tanh(g) * u",
               "gemma4 (hidden_act='gelu_pytorch_tanh')"),
    ExpertForm("swiglu_oai", True, swiglu_oai, swiglu_oai_backward,
               ("swiglu_limit", "swiglu_alpha"), (7.0, 1.702),
               "g = min(g, L); u = clip(u, -L, L); h = (u + 1) * g * sigmoid(alpha * g)",
               "gpt_oss, openai_privacy_filter, minimax_m3_vl (models/gpt_oss _apply_gate)"),
    ExpertForm("swiglu_clamped", True, swiglu_clamped, swiglu_clamped_backward,
               ("swiglu_limit",), (10.0,), "h = silu(min(g, L)) * clip(u, -L, L)",
               "deepseek_v4, hy_v4, hy_v4_vl, glm5_next (models/hy_v4 _apply_gate)"),
    ExpertForm("swiglu_clamp_after", True, swiglu_clamp_after, swiglu_clamp_after_backward,
               ("swiglu_limit",), (math.inf,), "h = min(silu(g), L) * clip(u, -L, L)",
               "step3p7 (models/step3p7: per-layer limits, 0 or none = no clamp)"),
    ExpertForm("swiglu_softcap", True, swiglu_softcap, swiglu_softcap_backward,
               ("swiglu_softcap",), ((4.0, 25.0),),
               "h = c_g tanh(g / c_g) * sigmoid(g) * c_u tanh(u / c_u)",
               "inkling2, inkling2_loop (models/inkling2 Inkling2SoftcappedSwiGLU)"),
)}


@dataclass(frozen=True)
class FormSpec:
    """A form with its arguments resolved (what experts_forward runs): name, and args, the
    floats its forward and backward take after (a, out) / (dh, a, out)."""
    name: str
    args: tuple[float, ...] = ()

    @property
    def form(self) -> ExpertForm:
        return EXPERT_FORMS[self.name]

    @property
    def gated(self) -> bool:
        return self.form.gated

    def forward(self, a: np.ndarray, out: np.ndarray) -> None:
        fwd = self.form.forward
        assert fwd is not None
        fwd(a, out, *self.args)

    def backward(self, dh: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
        bwd = self.form.backward
        assert bwd is not None
        bwd(dh, a, out, *self.args)


def form_spec(activation: str | FormSpec, **given: object) -> FormSpec:
    """The FormSpec of `activation` with its keywords (swiglu_limit, ...) from `given` where not
    None, else the form's defaults; the values are assumed checked (options.py checks them)."""
    if isinstance(activation, FormSpec):
        return activation
    form = EXPERT_FORMS[activation]
    args: list[float] = []
    for kw, default in zip(form.keywords, form.defaults):
        v = given.get(kw)
        v = default if v is None else v
        if activation == "swiglu_clamp_after" and v == 0:  # step3p7 writes 0 for "no clamp"
            v = math.inf
        args.extend(v if isinstance(v, tuple) else (v,))
    return FormSpec(activation, tuple(float(v) for v in args))


def hidden_width(activation: str | FormSpec, H: int) -> int:
    """Columns of a = x @ w1 + b1: 2H for a gated form, H otherwise."""
    name = activation.name if isinstance(activation, FormSpec) else activation
    return 2 * H if EXPERT_FORMS[name].gated else H
