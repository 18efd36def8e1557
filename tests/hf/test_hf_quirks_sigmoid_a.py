"""HF oddities of the sigmoid 'aux-free' families (pymoe/hf/families/sigmoid_a.py), pinned on
literal cases: what pymoe reproduces, and what it refuses rather than fakes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import import_optional

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")
from tiny import compare, randomize, tiny_model, tolerances  # noqa: E402
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


def test_axk2_group_fill_zero_is_hf():
    """group_fill=0.0 routes the case above as HF does: expert 0, then the lowest-index expert of
    the dropped group (HF's tie at 0.0 among 4..7: torch gives one of them, pymoe the lowest)."""
    ours = pymoe.route(np.zeros((1, 8)), 2, None, expert_bias=BIAS, preset="deepseek-v3",
                       num_groups=2, topk_groups=1, group_score_k=2, scaling_factor=1.0,
                       group_fill=0.0)
    assert ours.expert_index[0].tolist() == [0, 4]
    assert ours.gate[0].tolist() == [0.5, 0.5]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_axk2_with_groups_matches_hf(dtype):
    """axk2 with groups on (4 groups of 2, 2 kept): HF's 0.0 fill is group_fill=0.0. The tiny
    model's sigmoid scores of N(0, 5) logits are often near 0 and its biases N(0, 0.3), so
    s + b < 0 for kept experts does happen and the fill decides some tokens."""
    c = compare("axk2", dtype, n_group=4, topk_group=2)
    fwd, bwd = tolerances("axk2", dtype)
    assert c.chosen_differ == 0 and c.state_exact
    assert c.y <= fwd and c.dx <= bwd and max(c.grads.values()) <= bwd, c


def test_axk2_fill_decides_only_through_ties():
    """Where the 0.0 fill decides (biases shifted by -0.4 so that some kept experts have s + b
    < 0), a token takes experts of a dropped group, which all rank at exactly 0.0: a tie, which
    torch.topk breaks in its own order and pymoe by the lowest index. Every token agrees with HF
    except inside such a tie, and at least one token is decided by the fill."""
    model, cfg = tiny_model("axk2", n_group=4, topk_group=2)
    block = _find_block(model).double()
    randomize(block, 0)
    with torch.no_grad():
        block.gate.e_score_correction_bias -= 0.4
    x = np.random.default_rng(0).standard_normal((64, cfg.hidden_size))
    layer = pymoe.hf.from_transformers(block, cfg)
    layer.forward(x)
    r = layer.routing
    ranked = r.probs + layer.expert_bias  # [T, E] what both rank before the group limit
    _, _, hf = block.gate(torch.from_numpy(x)[None])
    hf = hf.numpy()
    by_fill = 0
    for t in range(x.shape[0]):
        ours, theirs = set(r.expert_index[t].tolist()), set(hf[t].tolist())
        picked_by_fill = (ours | theirs) - _kept_experts(ranked[t], 4, 2)  # ranked 0.0
        by_fill += bool(picked_by_fill)
        assert ours ^ theirs <= picked_by_fill, (t, ours, theirs)
    assert by_fill >= 1


def _kept_experts(ranked, groups: int, keep: int) -> set[int]:
    """The experts of a token's best `keep` groups (top-2 sums of s + b), as AXK2 keeps them."""
    g = np.sort(ranked.reshape(groups, -1), axis=1)[:, -2:].sum(axis=1)
    size = ranked.size // groups
    return {int(i) * size + j for i in np.argsort(-g, kind="stable")[:keep] for j in range(size)}


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
