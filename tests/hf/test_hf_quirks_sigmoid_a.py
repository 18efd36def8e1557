"""HF oddities of the sigmoid 'aux-free' families (pymoe/hf/families/sigmoid_a.py), pinned on
literal cases: what pymoe reproduces, and what it refuses rather than fakes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import import_optional

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")
from tiny import compare, tiny_model, tolerances  # noqa: E402
from transformers.models.axk2.modeling_axk2 import AXK2TopkRouter  # noqa: E402

import pymoe  # noqa: E402
import pymoe.hf  # noqa: E402
from pymoe.hf.transformers_block import _find_block  # noqa: E402

# E = 8 in 2 groups of 4, keep 1 group, K = 2. Zero router weights: s = sigmoid(0) = 0.5 for
# every expert, so s + b is 0.5 + BIAS = [0.9, -0.1, -0.2, -0.3 | 0.3, 0.2, 0.1, 0.1]. Group
# scores (top-2 sums): 0.8 and 0.5, so group 0 is kept. With masked scores at -inf (DeepSeek-V3,
# pymoe) the top 2 are experts 0 and 1; AXK2 sets them to 0.0, which beats expert 1's -0.1, so
# its second choice is an expert of the dropped group (4..7, all tied at 0.0).
BIAS = np.array([0.4, -0.6, -0.7, -0.8, -0.2, -0.3, -0.4, -0.4])


def test_axk2_fills_dropped_groups_with_zero_not_minus_inf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AXK2Config(hidden_size=4, n_routed_experts=8, num_experts_per_tok=2,
                                      n_group=2, topk_group=1, norm_topk_prob=True,
                                      routed_scaling_factor=1.0)
    router = AXK2TopkRouter(cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.e_score_correction_bias.copy_(torch.from_numpy(BIAS).float())
    _, weights, chosen = router(torch.ones(1, 1, 4))
    hf = sorted(chosen[0].tolist())
    assert hf[0] == 0 and hf[1] in (4, 5, 6, 7), hf  # a dropped group's expert is chosen
    assert weights[0].tolist() == [0.5, 0.5]  # gates are s: both 0.5, renormalised

    ours = pymoe.route(np.zeros((1, 8)), 2, None, expert_bias=BIAS, preset="deepseek-v3",
                       num_groups=2, topk_groups=1, group_score_k=2, scaling_factor=1.0)
    assert sorted(ours.expert_index[0].tolist()) == [0, 1]  # -inf fill: group 0 only


def test_axk2_with_groups_is_refused():
    """pymoe.hf loads axk2 with groups off (n_group None, the default config, checked in
    test_blocks) and refuses n_group > 1 instead of routing by -inf."""
    model, cfg = tiny_model("axk2", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="0.0"):
        pymoe.hf.from_transformers(_find_block(model), cfg)


def test_dots1_default_norm_topk_prob_false():
    """Dots1Config defaults norm_topk_prob to False (the tiny config uses the checkpoints' True):
    the raw sigmoid gates times the scaling factor."""
    assert transformers.Dots1Config().norm_topk_prob is False
    c = compare("dots1", np.float64, norm_topk_prob=False)
    fwd, bwd = tolerances("dots1", np.float64)
    assert c.chosen_differ == 0 and c.state_exact
    assert c.y <= fwd and c.dx <= bwd and max(c.grads.values()) <= bwd, c


def test_beam_scales_the_summed_output():
    """BeamTopKRouter returns unscaled gates and BeamMoE multiplies the summed expert output by
    routed_scaling_factor (2.5 in test_blocks): pymoe scales the gates instead, the same sum."""
    model, cfg = tiny_model("beam", routed_scaling_factor=3.0)
    block = _find_block(model)
    _, weights, _ = block.gate(torch.randn(1, 4, cfg.hidden_size))
    assert torch.allclose(weights.sum(-1), torch.ones(4))  # unscaled, renormalised
    assert pymoe.hf.from_transformers(block, cfg).options.scaling_factor == 3.0
