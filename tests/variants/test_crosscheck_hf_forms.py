"""Cross-check: each expert form against the HF transformers code that defines it, forward and
torch autograd's gradient, in float64 on CPU (the crosscheck extra). The model files' own gate
functions are called (`GptOssExperts._apply_gate`, ...) with a stand-in for `self` that holds the
attributes they read, on [gate | up] built from pymoe's a, including values at the clamp limits,
where torch.clamp passes the gradient."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from helpers import import_optional
from pymoe.expert_forms import EXPERT_FORMS, form_spec

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402
from transformers.models.hy_v4 import modeling_hy_v4  # noqa: E402
from transformers.models.inkling2 import modeling_inkling2  # noqa: E402
from transformers.models.step3p7 import modeling_step3p7  # noqa: E402

# float64 against float64: the deterministic exp is within 1 ulp of libm's, and tanh built on it
# carries an absolute error of ~1 ulp of 1; inkling2 runs its activation in float32 even for a
# float64 model (`gate.float()`), so it is compared to float32 accuracy.
TOL = dict(rtol=1e-12, atol=1e-13)
TOL_F32 = dict(rtol=2e-6, atol=2e-6)


def _gated(fn):
    """HF form on chunk(2) [gate | up] input."""
    return lambda a: fn(*a.chunk(2, dim=-1))


def _hf(name: str, args: tuple):
    if name == "gelu":
        return ACT2FN["gelu_pytorch_tanh"], TOL
    if name == "relu2":
        return ACT2FN["relu2"], TOL
    if name == "swiglu":
        return _gated(lambda g, u: ACT2FN["silu"](g) * u), TOL
    if name == "geglu":
        return _gated(lambda g, u: ACT2FN["gelu_pytorch_tanh"](g) * u), TOL
    if name == "swiglu_oai":  # gpt-oss interleaves gate and up: gate_up[..., ::2], [..., 1::2]
        me = SimpleNamespace(limit=args[0], alpha=args[1])

        def oai(a):
            g, u = a.chunk(2, dim=-1)
            return modeling_gpt_oss.GptOssExperts._apply_gate(me, torch.stack([g, u], -1).flatten(-2))
        return oai, TOL
    if name == "swiglu_clamped":
        me = SimpleNamespace(swiglu_limit=args[0])
        return lambda a: modeling_hy_v4.HYV4Experts._apply_gate(me, a), TOL
    if name == "swiglu_clamp_after":
        me = SimpleNamespace(act_fn=ACT2FN["silu"], limit=args[0])
        return lambda a: modeling_step3p7.Step3p7Experts._apply_gate(me, a), TOL
    if name == "swiglu_softcap":
        cfg = SimpleNamespace(mlp_gate_softcap=args[0], mlp_up_softcap=args[1])
        me = SimpleNamespace(act_fn=modeling_inkling2.Inkling2SoftcappedSwiGLU(cfg))
        return lambda a: modeling_inkling2.Inkling2Experts._apply_gate(me, a), TOL_F32
    raise KeyError(name)


CASES = [("gelu", {}), ("relu2", {}), ("swiglu", {}), ("geglu", {}), ("swiglu_oai", {}),
         ("swiglu_oai", dict(swiglu_limit=1.0, swiglu_alpha=2.5)), ("swiglu_clamped", {}),
         ("swiglu_clamped", dict(swiglu_limit=0.75)), ("swiglu_clamp_after", {}),
         ("swiglu_clamp_after", dict(swiglu_limit=0.5)), ("swiglu_softcap", {}),
         ("swiglu_softcap", dict(swiglu_softcap=(0.5, 1.5)))]


@pytest.mark.parametrize("name, kw", CASES)
def test_form_matches_the_hf_code_forward_and_autograd(name, kw):
    spec = form_spec(name, **kw)
    fn, tol = _hf(name, spec.args)
    rng = np.random.default_rng(0)
    H = 16
    W = 2 * H if EXPERT_FORMS[name].gated else H
    a = rng.normal(size=(12, W)) * 3
    limit = spec.args[0] if "swiglu_limit" in EXPERT_FORMS[name].keywords else None
    if limit is not None and np.isfinite(limit):  # exactly at the bounds
        a[0, :4] = limit
        a[1, -4:] = [limit, -limit, limit, -limit]
    dh = rng.normal(size=(12, H))
    h = np.empty((12, H))
    spec.forward(a, h)
    da = np.empty_like(a)
    spec.backward(dh, a, da)
    at = torch.tensor(a, requires_grad=True)
    ht = fn(at)
    ht.backward(torch.tensor(dh, dtype=ht.dtype))
    np.testing.assert_allclose(h, ht.detach().double().numpy(), **tol)
    np.testing.assert_allclose(da, at.grad.numpy(), **tol)
