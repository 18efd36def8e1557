"""Cross-check: the megatron (and deepseek-v3) presets against Megatron-Core's routing functions
(megatron.core.transformer.moe.moe_utils), on CPU: topk_routing_with_score_function,
apply_router_token_dropping, compute_routing_scores_for_aux_loss,
switch_load_balancing_loss_func and get_capacity, called the way TopKRouter.routing calls them.

Megatron computes the router softmax in float32 (`dtype=torch.float32` in
topk_routing_with_score_function) whatever the logits' dtype, so only float32 is compared. Its
combine is a permutation, not a [T, E, C] tensor; its slots are token order per expert
(`permute`), which crosscheck.combine_from_slots builds from its kept pairs.
"""
from __future__ import annotations

import numpy as np
import pytest

from crosscheck import CASES, Outcome, assert_same, combine_from_slots, ours, tied_logits
from helpers import import_optional

torch = import_optional("torch", "crosscheck")
moe_utils = import_optional("megatron.core.transformer.moe.moe_utils", "crosscheck")

T, E = 48, 8


def megatron_route(logits: np.ndarray, k: int, capacity_factor: float | None, *,
                   pre_softmax: bool = False, drop_policy: str = "probs",
                   score_function: str = "softmax", num_groups: int | None = None,
                   group_topk: int | None = None, scaling_factor: float | None = None,
                   expert_bias: np.ndarray | None = None) -> Outcome:
    """TopKRouter.routing: top-K with the score function, dropping when a capacity factor is set,
    and the aux loss (coeff 1) from compute_routing_scores_for_aux_loss + the Switch loss."""
    x = torch.from_numpy(logits)
    bias = None if expert_bias is None else torch.from_numpy(expert_bias.astype(np.float32))
    probs, routing_map = moe_utils.topk_routing_with_score_function(
        x, k, use_pre_softmax=pre_softmax, num_groups=num_groups, group_topk=group_topk,
        scaling_factor=scaling_factor, score_function=score_function, expert_bias=bias)
    chosen = routing_map.numpy().copy()
    capacity = None
    if capacity_factor is not None:
        capacity = min(moe_utils.get_capacity(T * k, E, capacity_factor), T)
        probs, routing_map = moe_utils.apply_router_token_dropping(
            probs, routing_map, k, capacity_factor, drop_policy=drop_policy)
    aux_map, aux_scores = moe_utils.compute_routing_scores_for_aux_loss(x, k, score_function)
    aux = moe_utils.switch_load_balancing_loss_func(aux_scores, aux_map.sum(dim=0), T, k,
                                                    logits.shape[1], 1.0)
    kept = routing_map.numpy()
    gate = np.where(kept, probs.double().numpy(), 0.0)
    combine = None if capacity is None else combine_from_slots(kept, gate, "token", capacity)
    return Outcome(chosen, kept, gate, combine, float(aux), capacity)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [2, 4])
def test_megatron(case, k):
    """Default TopKRouter: softmax over the top-K logits, drop policy "probs". The tie case
    (equal probabilities compete for slots, and torch.topk's pick among them is undocumented) is
    checked dropless; the others also with capacity factors that drop."""
    if case == "ties":
        logits, factors = tied_logits(T, E, np.float32, k=k), (None,)
    else:
        logits, factors = CASES[case](T, E, np.float32), (None, 1.0, 0.5)
    for cf in factors:
        theirs = megatron_route(logits, k, cf)
        if case == "skewed" and cf is not None:
            assert not theirs.kept[theirs.chosen].all()
        assert_same(ours("megatron", logits, k, cf), theirs, np.float32, "megatron")


@pytest.mark.parametrize("case", ["random", "skewed"])
def test_megatron_top1(case):
    """K = 1 needs moe_router_pre_softmax (Megatron rejects K = 1 without it): the raw
    probability, as the preset gives for K = 1."""
    logits = CASES[case](T, E, np.float32)
    for cf in (None, 1.0):
        assert_same(ours("megatron", logits, 1, cf), megatron_route(logits, 1, cf, pre_softmax=True),
                    np.float32, "megatron")


def test_position_policy_keeps_an_unspecified_subset():
    """Known bug (docs/conventions.md, section 11): drop_policy "position" is documented as
    dropping "tokens at the end of each batch", but apply_router_token_dropping keeps what
    torch.topk returns among equal 0/1 entries; pymoe keeps the first C in priority order.
    Literal case (torch 2.13): 21 tokens all choosing expert 0 of 2 with K = 1, capacity 4."""
    logits = np.tile(np.array([[1.0, 0.0]], np.float32), (21, 1))
    x = torch.from_numpy(logits)
    probs, routing_map = moe_utils.topk_routing_with_score_function(x, 1, use_pre_softmax=True)
    cf = 4 * 2 / 21
    _, kept = moe_utils.apply_router_token_dropping(probs, routing_map, 1, cf, drop_policy="position")
    mine = ours("megatron", logits, 1, cf, drop_policy="position")
    assert mine.capacity == moe_utils.get_capacity(21, 2, cf) == 4
    assert np.flatnonzero(mine.kept[:, 0]).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(kept[:, 0].numpy()).tolist() != [0, 1, 2, 3]  # torch's pick instead
    assert kept[:, 0].sum() == 4


# ---------------------------------------------------------------- DeepSeek-V3 in Megatron

@pytest.mark.parametrize("case", ["random", "skewed"])
@pytest.mark.parametrize("biased", [False, True])
def test_deepseek_v3_routing(case, biased):
    """score_function="sigmoid", 8 groups keep 4, scaling 2.5, expert bias: the deepseek-v3
    preset's experts and gates; its aux loss where the group limit and the bias leave every
    token's choice as its plain top-K (Megatron counts f on the plain top-K of the sigmoid
    scores, compute_routing_scores_for_aux_loss; pymoe counts the experts actually chosen)."""
    E_, K = 32, 8
    logits = CASES[case](T, E_, np.float32)
    bias = np.random.default_rng(5).normal(0, 0.3, E_) if biased else None
    theirs = megatron_route(logits, K, None, score_function="sigmoid", num_groups=8, group_topk=4,
                            scaling_factor=2.5, expert_bias=bias)
    mine = ours("deepseek-v3", logits, K, None, expert_bias=bias)
    plain = megatron_route(logits, K, None, score_function="sigmoid", scaling_factor=2.5)
    if not np.array_equal(theirs.chosen, plain.chosen):
        # the two conventions count different pairs here (docs/conventions.md, section 8)
        assert abs(mine.aux - theirs.aux) > 1e-6
        theirs.aux = None
    assert_same(mine, theirs, np.float32, "deepseek-v3")


def test_deepseek_v3_aux_without_groups():
    """Without group limit and bias both count the same pairs: the sequence loss of one
    sequence, E * sum_e f_e P_e over the normalised sigmoid scores, agrees."""
    logits = CASES["skewed"](T, 32, np.float32)
    theirs = megatron_route(logits, 8, None, score_function="sigmoid", scaling_factor=2.5)
    mine = ours("deepseek-v3", logits, 8, None, num_groups=None, topk_groups=None,
                group_score_k=None)
    assert_same(mine, theirs, np.float32, "deepseek-v3")


def test_capacity_formula():
    """get_capacity(T*K, E, cf) = ceil(T*K/E * cf), the preset's capacity, except where float
    rounding lifts an exact product past an integer (test_float_capacity)."""
    for t, k, cf in [(48, 2, 1.0), (48, 2, 1.25), (100, 2, 0.7), (37, 3, 0.9), (64, 4, 2.0)]:
        r = ours("megatron", CASES["random"](t, E, np.float32), k, cf)
        assert r.capacity == min(moe_utils.get_capacity(t * k, E, cf), t)


def test_float_capacity():
    """Known difference (docs/conventions.md, section 5): Megatron (and DeepSpeed) compute
    ceil(T*K/E * cf) in floating point; 100 tokens, K = 2, 4 experts, cf 1.1 is 50 * 1.1 =
    55.00000000000001 there, so C = 56, where the exact product, and pymoe, give 55."""
    assert moe_utils.get_capacity(100 * 2, 4, 1.1) == 56
    assert ours("megatron", CASES["random"](100, 4, np.float32), 2, 1.1).capacity == 55
