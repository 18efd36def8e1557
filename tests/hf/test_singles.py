"""The single-family conventions of pymoe/hf/families/singles.py beyond test_blocks (which runs
each family's first layer): DeepSeek-V4's hash layers, and what HF's DeepSeek-V4 cannot build."""
from __future__ import annotations

import numpy as np
import pytest
from tiny import compare, tiny_model, tolerances


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_deepseek_v4_hash_layer_matches_hf(dtype):
    """A 'hash_moe' layer (DeepseekV4HashRouter): experts tid2eid[input_ids] (a random table,
    configs_singles.INPUTS), gates the renormalised sqrt-softplus scores x 1.5; pymoe's layer
    gets the table as hash_table and the ids as forward(x, token_ids=)."""
    c = compare("deepseek_v4", dtype, mlp_layer_types=["hash_moe", "moe"])
    fwd, bwd = tolerances("deepseek_v4", dtype)
    assert c.chosen_differ == 0 and c.state_exact
    assert c.y <= fwd and c.dx <= bwd and max(c.grads.values()) <= bwd, c


def test_deepseek_v4_softmax_scoring_is_not_buildable_in_hf():
    """HF quirk: the config documents scoring_func 'softmax', but ACT2FN has no 'softmax', so the
    router cannot be built (pymoe.hf maps it to score='softmax', unchecked against HF)."""
    with pytest.raises(KeyError, match="softmax"):
        tiny_model("deepseek_v4", scoring_func="softmax")


def _hf_sparsemixer_with(draws_exp, draws_u, logits, eps):
    """HF's own sparsemixer in training mode, its random draws replaced by ours: each
    Tensor.exponential_() takes the next [T, E] array of draws_exp, each torch.rand_like the next
    [T] of draws_u (its .uniform_() redraw in pick 2 is left a no-op, so the value stays ours)."""
    import torch
    from transformers.models.phimoe import modeling_phimoe as phimoe
    exp, uni = list(draws_exp), list(draws_u)

    def exponential_(t, *a, **k):
        t.copy_(torch.from_numpy(exp.pop(0)).to(t.dtype))
        return t

    def rand_like(t, *a, **k):
        return torch.from_numpy(uni.pop(0)).to(t.dtype).reshape(t.shape)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "exponential_", exponential_)
        mp.setattr(torch.Tensor, "uniform_", lambda t, *a, **k: t)
        mp.setattr(torch, "rand_like", rand_like)
        mult, sel = phimoe.sparsemixer(logits, jitter_eps=eps, training=True)
    assert not exp and not uni  # HF drew exactly what pymoe draws
    return mult, sel


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_phimoe_training_sparsemixer_matches_hf(dtype):
    """Training mode: pymoe's Gumbel picks and Heun factors against HF's sparsemixer fed the
    same draws (the twin generator replays pymoe's documented order: exponentials [T, E], then
    uniforms [T], per pick), and route_backward against torch's autograd through HF's
    PhimoeMultiplier (the estimator: the Heun factor is in the value, not in the gradient)."""
    import torch

    import pymoe
    T, E, eps = 256, 8, 0.25
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((T, E)) * 2).astype(dtype)
    dgate = rng.standard_normal((T, 2)).astype(dtype)
    r = pymoe.route(logits, 2, None, preset="phimoe", sparsemixer_eps=eps,
                    sparsemixer_sampling=True, seed=np.random.default_rng(7))
    twin = np.random.default_rng(7)
    draws = [(twin.standard_exponential((T, E)), twin.random(T)) for _ in range(2)]
    lt = torch.from_numpy(logits.copy()).requires_grad_(True)
    mult, sel = _hf_sparsemixer_with([d[0] for d in draws], [d[1] for d in draws], lt, eps)
    np.testing.assert_array_equal(r.expert_index, sel.numpy())
    # the draws move picks off the best: the estimator's both branches are exercised
    assert (r.expert_index[:, 0] != logits.argmax(-1)).sum() > 10
    assert (np.abs(r.gate / np.take_along_axis(
        pymoe.variants.sparsemixer.pick_probs(r.router_logits, r.expert_index, eps),
        r.expert_index[:, :, None], -1)[:, :, 0] - 0.3333) < 1e-6).sum() > 10
    tol = 1e-12 if dtype == np.float64 else 1e-6  # the same formulas, different op order
    np.testing.assert_allclose(r.gate, mult.detach().numpy(), rtol=tol, atol=tol)
    (mult * torch.from_numpy(dgate)).sum().backward()
    ours = pymoe.route_backward(r, dgate)
    np.testing.assert_allclose(ours, lt.grad.numpy(), rtol=tol, atol=tol)


def test_doge_aux_loss_is_the_switch_loss_on_the_pair_sums():
    """Doge's own load_balancing_loss_func for one layer (f = counts / (T K), P = the softmax
    over all E pair sums, E sum f P) equals the doge preset's aux loss (load_balancing="switch")
    on the same router_gate logits, read through HF's view(2, T, n)."""
    import torch
    from transformers.models.doge import modeling_doge as doge

    import pymoe
    from pymoe.variants.product_keys import product_key_logits
    T, n, K = 64, 4, 2
    keys = np.random.default_rng(0).standard_normal((T, 2 * n)) * 2  # router_gate(x) [T, 2n]
    theirs = doge.load_balancing_loss_func((torch.from_numpy(keys).view(2, T, n),),
                                           num_experts=n * n, num_keys=n, top_k=K)
    r = pymoe.route(product_key_logits(keys, "doge"), K, preset="doge")
    assert r.aux_loss == pytest.approx(float(theirs), rel=1e-12)  # the same sums, reordered
