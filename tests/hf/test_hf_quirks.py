"""HF transformers 5.24 behaviours pymoe does not copy, pinned on literal cases (each assert is
what HF does today, so a test fails loudly the day HF changes it; docs/conventions.md lists them
with what pymoe does instead). The per-convention quirks of the families pymoe.hf loads are in
test_hf_quirks_<group>.py."""
from __future__ import annotations

import numpy as np
from tiny import tiny_model

from helpers import import_optional

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as dsv4  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402
from transformers.models.phimoe import modeling_phimoe as phimoe  # noqa: E402

import pymoe  # noqa: E402
import pymoe.hf  # noqa: E402


def test_phimoe_jitters_the_input_twice_in_place():
    """PhimoeSparseMoeBlock multiplies hidden_states by U(1-eps, 1+eps) in place, and
    PhimoeTopKRouter does it again on the same tensor: the experts see x*u1*u2 and the
    caller's tensor is changed (pymoe's jitter reaches the router's copy only, once)."""
    model, cfg = tiny_model("phimoe", input_jitter_noise=0.5)
    block = next(m for m in model.modules() if isinstance(m, phimoe.PhimoeSparseMoeBlock))
    block.train()
    seen: dict = {}

    def keep(name):
        def hook(_module, args):
            seen.setdefault(name, args[0].clone())  # returns None: the input is unchanged
        return hook
    block.router.register_forward_pre_hook(keep("router_in"))
    block.experts.register_forward_pre_hook(keep("experts_in"))
    x = torch.ones(1, 16, cfg.hidden_size)
    with torch.no_grad():
        block(x)
    assert not torch.equal(x, torch.ones_like(x))  # the caller's tensor was jittered
    once = seen["router_in"].reshape(-1)  # x * u1 (block), before the router's own jitter
    twice = seen["experts_in"].reshape(-1)  # x * u1 * u2
    assert not torch.equal(once, twice)
    assert float(once.min()) >= 0.5 and float(once.max()) <= 1.5
    assert float(twice.min()) < 0.5 or float(twice.max()) > 1.5  # outside one U(0.5, 1.5)


def test_deepseek_v4_never_reads_norm_topk_prob():
    """DeepseekV4TopKRouter always renormalises (/(sum + 1e-20)), whatever norm_topk_prob says."""
    cfg = transformers.DeepseekV4Config(hidden_size=16, n_routed_experts=8, num_local_experts=8,
                                        num_experts_per_tok=2, norm_topk_prob=False)
    router = dsv4.DeepseekV4TopKRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        _, weights, _ = router(torch.randn(1, 6, 16))
    np.testing.assert_allclose(weights.sum(-1).numpy() / cfg.routed_scaling_factor, 1.0,
                               rtol=1e-6)


def test_generic_loss_balances_a_selection_a_biased_router_never_makes():
    """load_balancing_loss_func recomputes a plain softmax top-K from the logits: a DeepSeek-
    style router whose selection bias sends every token to experts 0 and 1 still scores the
    unbiased softmax selection. pymoe.hf.load_balancing_loss reproduces HF's number; the
    layer's own aux loss counts the real selection."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 8)).astype(np.float32)
    bias = np.array([10.0, 10.0, 0, 0, 0, 0, 0, 0])
    real = pymoe.route(logits, 2, None, preset="glm4-moe", expert_bias=bias)
    assert set(np.unique(real.expert_index)) == {0, 1}
    hf = float(load_balancing_loss_func((torch.from_numpy(logits),), 8, 2))
    assert pymoe.hf.load_balancing_loss([logits], 8, 2) == pytest_approx(hf)
    plain = pymoe.route(logits, 2, None, preset="mixtral")
    assert hf == pytest_approx(plain.aux_loss)  # the selection HF scores: plain top-K


def pytest_approx(v: float):
    import pytest
    return pytest.approx(v, rel=1e-6)
