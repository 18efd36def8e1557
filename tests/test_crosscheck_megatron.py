"""Cross-check: pymoe against Megatron-Core's routing functions (megatron.core.transformer.moe.
moe_utils), on CPU: topk_routing_with_score_function, apply_router_token_dropping,
switch_load_balancing_loss_func and get_capacity, called the way TopKRouter.routing calls them.

Megatron computes the router softmax in float32 (`dtype=torch.float32` in
topk_routing_with_score_function) whatever the logits' dtype, so only float32 is compared.
"""
from __future__ import annotations

import numpy as np
import pytest

from crosscheck import CASES, Outcome, assert_same, ours, tied_logits
from helpers import import_optional

torch = import_optional("torch", "crosscheck", module_level=True)
moe_utils = import_optional("megatron.core.transformer.moe.moe_utils", "crosscheck", module_level=True)

T, E = 48, 8


def megatron_route(logits: np.ndarray, k: int, capacity_factor: float | None, *,
                   pre_softmax: bool = False, drop_policy: str = "probs") -> Outcome:
    """TopKRouter.routing with score_function="softmax": top-K, dropping when a capacity factor is
    set, and the aux loss from compute_routing_scores_for_aux_loss + the Switch loss (coeff 1)."""
    x = torch.from_numpy(logits)
    probs, routing_map = moe_utils.topk_routing_with_score_function(x, k, use_pre_softmax=pre_softmax)
    chosen = routing_map.numpy().copy()
    if capacity_factor is not None:
        probs, routing_map = moe_utils.apply_router_token_dropping(
            probs, routing_map, k, capacity_factor, drop_policy=drop_policy)
    aux_map, aux_scores = moe_utils.compute_routing_scores_for_aux_loss(x, k, "softmax")
    aux = moe_utils.switch_load_balancing_loss_func(aux_scores, aux_map.sum(dim=0), T, k, E, 1.0)
    kept = routing_map.numpy()
    gate = np.where(kept, probs.double().numpy(), 0.0)
    return Outcome(chosen, kept, gate, None, float(aux))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [2, 4])
def test_dropless(case, k):
    logits = tied_logits(T, E, np.float32, k=k) if case == "ties" else CASES[case](T, E, np.float32)
    assert_same(ours("megatron", logits, k, None), megatron_route(logits, k, None), np.float32,
                "megatron")


def test_capacity_formula():
    """get_capacity(T*K, E, cf) = ceil(T*K/E * cf), as pymoe's default capacity, except where
    float rounding lifts an exact product past an integer (see test_float_capacity)."""
    for t, k, cf in [(48, 2, 1.0), (48, 2, 1.25), (100, 2, 0.7), (37, 3, 0.9), (64, 4, 2.0)]:
        r = ours("megatron", CASES["random"](t, E, np.float32), k, cf)
        assert r.capacity == min(moe_utils.get_capacity(t * k, E, cf), t)


def test_float_capacity():
    """Known difference (docs/conventions.md, capacity): Megatron (and DeepSpeed) compute
    ceil(T*K/E * cf) in floating point; 100 tokens, K = 2, 4 experts, cf 1.1 is 50 * 1.1 =
    55.00000000000001 there, so C = 56, where the exact product, and pymoe, give 55."""
    assert moe_utils.get_capacity(100 * 2, 4, 1.1) == 56
    assert ours("megatron", CASES["random"](100, 4, np.float32), 2, 1.1).capacity == 55
