"""Cross-check: pymoe's padding masks against Megatron-Core 0.16.1's (the crosscheck extra), run
on CPU the way TopKRouter.routing calls moe_utils with its padding_mask: z_loss_func,
topk_routing_with_score_function + apply_router_token_dropping on every token (padding is
routed and takes slots), compute_routing_scores_for_aux_loss + get_tokens_per_expert_and_token_count's
count + switch_load_balancing_loss_func on the real tokens, TopKRouter._apply_expert_bias.

Megatron's padding_mask is True = padding in what router.py computes (`~padding_mask` are the
valid tokens), although the docstrings of routing() and apply_z_loss say True = valid
(Megatron-LM #5569); pymoe's token_mask is True = real. So route(..., token_mask=~padding_mask,
preset="megatron") (padding="routed") is compared with Megatron's padding_mask. Integers exact,
float32 values to the cross-check tolerance (2e-6).
"""
from __future__ import annotations

import types

import numpy as np
import pytest

import pymoe
from crosscheck import CASES, Outcome, assert_same, outcome
from helpers import import_optional

torch = import_optional("torch", "crosscheck")
moe_utils = import_optional("megatron.core.transformer.moe.moe_utils", "crosscheck")
router_mod = import_optional("megatron.core.transformer.moe.router", "crosscheck")

T, E = 48, 8


def _padding(seed: int) -> np.ndarray:
    """Megatron's padding_mask `<bool>[T]`: True = padding (a third of the tokens)."""
    pad = np.random.default_rng(seed).random(T) < 1 / 3
    pad[0] = False
    return pad


def megatron_masked(logits: np.ndarray, k: int, capacity_factor: float | None,
                    padding_mask: np.ndarray) -> tuple[Outcome, float, np.ndarray]:
    """(routing outcome with the aux loss, z-loss, tokens per expert for the bias update)."""
    x, pm = torch.from_numpy(logits), torch.from_numpy(padding_mask)
    z = moe_utils.z_loss_func(x, 1.0, padding_mask=pm)
    probs, routing_map = moe_utils.topk_routing_with_score_function(x, k, use_pre_softmax=False)
    chosen = routing_map.numpy().copy()
    capacity = None
    if capacity_factor is not None:
        capacity = min(moe_utils.get_capacity(T * k, E, capacity_factor), T)
        probs, routing_map = moe_utils.apply_router_token_dropping(
            probs, routing_map, k, capacity_factor, drop_policy="probs")
    aux_map, aux_scores = moe_utils.compute_routing_scores_for_aux_loss(
        x, k, "softmax", padding_mask=pm)
    # get_tokens_per_expert_and_token_count(with_padding_mask=True) on one rank (its reduce
    # needs torch.distributed): the counts, and T = their sum / K, the real tokens
    per_expert = aux_map.sum(dim=0)
    total = per_expert.sum() / k
    aux = moe_utils.switch_load_balancing_loss_func(aux_scores, per_expert, total, k, E, 1.0)
    kept = routing_map.numpy()
    gate = np.where(kept, probs.double().numpy(), 0.0)
    # the bias update's counts: TopKRouter._apply_expert_bias with #6114's broadcast
    # (0.16.1's `routing_map & ~padding_mask` crashes, test_expert_bias_crash_in_0_16_1)
    load = (routing_map & ~pm.unsqueeze(-1)).sum(dim=0).numpy()
    return Outcome(chosen, kept, gate, None, float(aux), capacity), float(z), load


@pytest.mark.parametrize("case", ["random", "skewed"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("cf", [None, 1.0, 0.5])
def test_megatron_padding_mask(case, k, cf):
    logits = CASES[case](T, E, np.float32)
    pad = _padding(k)
    theirs, z, load = megatron_masked(logits, k, cf, pad)
    r = pymoe.route(logits, k, cf, preset="megatron", token_mask=~pad)
    assert r.padding == "routed"
    mine = outcome(r)
    mine.combine = None
    assert_same(mine, theirs, np.float32, "megatron+padding")
    assert r.z_loss == pytest.approx(z, rel=2e-6)
    np.testing.assert_array_equal(r.expert_load_kept, load)  # kept real pairs per expert
    if cf is None:  # dropless: the load before dropping is the same count
        np.testing.assert_array_equal(r.expert_load, load)
    if case == "skewed" and cf == 0.5:  # padding took slots real tokens would have had
        absent = pymoe.route(logits, k, cf, preset="megatron", padding="absent", token_mask=~pad)
        assert absent.capacity < r.capacity or not np.array_equal(
            absent.kept[~pad], r.kept[~pad])


def test_megatron_statistics_leave_padding_values_out():
    """Megatron's masked aux and z-loss do not move with the padding rows' logits; nor do
    pymoe's (dropless, so that no real token's slot moves either)."""
    logits = CASES["random"](T, E, np.float32)
    pad = _padding(3)
    other = logits.copy()
    other[pad] = np.random.default_rng(4).normal(0, 4, size=(pad.sum(), E)).astype(np.float32)
    a, za, _ = megatron_masked(logits, 2, None, pad)
    b, zb, _ = megatron_masked(other, 2, None, pad)
    assert a.aux == pytest.approx(b.aux, rel=1e-6) and za == pytest.approx(zb, rel=1e-6)
    ra = pymoe.route(logits, 2, None, preset="megatron", token_mask=~pad)
    rb = pymoe.route(other, 2, None, preset="megatron", token_mask=~pad)
    assert (ra.aux_loss, ra.z_loss) == (rb.aux_loss, rb.z_loss)


def _apply_expert_bias():
    f = router_mod.TopKRouter._apply_expert_bias  # jit_fuser-wrapped: call the plain function
    return getattr(f, "_torchdynamo_orig_callable", getattr(f, "__wrapped__", f))


def test_expert_bias_crash_in_0_16_1():
    """Megatron-LM #6111: with an expert bias and a padding mask, 0.16.1's _apply_expert_bias
    computes routing_map [T, E] & ~padding_mask [T], which raises unless T == E (#6114 adds the
    missing unsqueeze(-1)); when T == E it broadcasts silently and masks experts by token index.
    pymoe's expert_load counts the real tokens' choices in either case."""
    fn = _apply_expert_bias()
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    routing_map[:, 0] = True
    me = types.SimpleNamespace(enable_expert_bias=True, local_tokens_per_expert=torch.zeros(E))
    pm = torch.from_numpy(_padding(5))
    with torch.enable_grad(), pytest.raises(RuntimeError, match="must match the size"):
        fn(me, routing_map, padding_mask=pm)
    square = torch.zeros(E, E, dtype=torch.bool)
    square[:, 0] = True  # every token on expert 0; token 0 is padding
    me = types.SimpleNamespace(enable_expert_bias=True, local_tokens_per_expert=torch.zeros(E))
    spm = torch.zeros(E, dtype=torch.bool)
    spm[0] = True
    with torch.enable_grad():
        fn(me, square, padding_mask=spm)
    got = me.local_tokens_per_expert.numpy()
    assert got[0] == 0  # 0.16.1 masks expert 0 (the index of the padding token) for every token
    fixed = (square & ~spm.unsqueeze(-1)).sum(dim=0).numpy()
    assert fixed[0] == E - 1  # #6114: the 7 real tokens on expert 0
    logits = np.tile(np.array([5.0] + [0.0] * (E - 1), np.float32), (E, 1))
    r = pymoe.route(logits, 1, None, preset="megatron", token_mask=~spm.numpy(),
                    expert_bias=np.zeros(E))
    np.testing.assert_array_equal(r.expert_load, fixed)


def test_megatron_mask_is_true_for_padding():
    """#5569: the docstrings say True = valid, the code excludes the True rows: a mask of all
    False (documented: all padding) gives Megatron's unmasked z-loss."""
    logits = CASES["random"](T, E, np.float32)
    x = torch.from_numpy(logits)
    none = torch.zeros(T, dtype=torch.bool)
    assert float(moe_utils.z_loss_func(x, 1.0, padding_mask=none)) == pytest.approx(
        float(moe_utils.z_loss_func(x, 1.0)), rel=1e-6)
    assert pymoe.route(logits, 2, None, preset="megatron", token_mask=~none.numpy()).z_loss \
        == pymoe.route(logits, 2, None, preset="megatron").z_loss
