"""pymoe.hf.load for the sigmoid_b families: a tiny model saved with save_pretrained (float32,
and bfloat16) loads as the layer from_transformers makes of the same block. nemotron_h: the
block is `mixer`, its non-gated experts are saved per expert as `experts.{i}.up_proj`; hy_v3:
per-expert gated experts and the selection bias on the block. Also: step3p7's per-layer SwiGLU
limits read by layer index, and lfm2_moe's 1e-6 renormalisation epsilon as the whole of its
difference from pymoe."""
from __future__ import annotations

import numpy as np
import pytest
from tiny import compare, randomize, tiny_model, tolerances

import pymoe.hf
from pymoe.hf.transformers_block import _find_block

torch = pytest.importorskip("torch")

LOADED = {"nemotron_h": 1, "hy_v3": 1}  # family -> the decoder layer loaded (both are MoE)


def _layer(model, i):
    inner = getattr(model, "model", model)
    return inner.layers[i]


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("family", sorted(LOADED))
def test_load_equals_from_transformers(family, bf16, tmp_path):
    model, cfg = tiny_model(family)
    i = LOADED[family]
    randomize(_find_block(_layer(model, i)), seed=1)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ours = pymoe.hf.load(tmp_path, i)
    block = _find_block(_layer(model, i))
    theirs = pymoe.hf.from_transformers(block.float() if bf16 else block, cfg)
    assert ours.dtype == theirs.dtype == np.float32
    assert ours.hf.family == family and ours.hf.layer == i
    assert sorted(ours.params) == sorted(theirs.params)
    for k, v in theirs.params.items():
        assert np.array_equal(ours.params[k], v), k
    assert np.array_equal(ours.expert_bias, theirs.expert_bias)
    sd, ref = pymoe.hf.state_dict(ours), pymoe.hf.state_dict(theirs)
    assert sorted(sd) == sorted(ref) and all(np.array_equal(sd[k], ref[k]) for k in ref)
    x = np.random.default_rng(0).standard_normal((16, cfg.hidden_size)).astype(np.float32)
    assert np.array_equal(ours.forward(x), theirs.forward(x))


def test_step3p7_limits_by_layer():
    """Different limits per layer: the decoder layer (its attention knows its layer_idx) gives
    each layer its own; the bare block, which does not know its index, is refused."""
    limits, shared = [0.5, 0.0], [0.0, 0.4]  # 0: no clamp
    model, cfg = tiny_model("step3p7", swiglu_limits=limits, swiglu_limits_shared=shared)
    for i in (0, 1):
        layer = pymoe.hf.from_transformers(_layer(model, i), cfg)
        assert layer.hf.layer == i
        assert layer.swiglu_limit == limits[i] and layer.shared_swiglu_limit == shared[i]
        assert layer.expert_form.args == (limits[i] or np.inf,)
        assert layer.shared_form.args == (shared[i] or np.inf,)
    with pytest.raises(ValueError, match="differ by layer"):
        pymoe.hf.from_transformers(_find_block(_layer(model, 0)), cfg)


def test_lfm2_moe_float64_to_round_off():
    """normalize_eps=1e-6 is HF's sum + 1e-6: float64 agrees to round-off (it was 5e-6 when
    pymoe divided by the plain sum)."""
    c = compare("lfm2_moe", np.float64)
    assert c.chosen_differ == 0
    assert max(c.y, c.dx, *c.grads.values()) <= 1e-12, c


def test_laguna_softcap_matches_hf():
    """moe_router_logit_softcapping = 3: the logits (N(0, ~5) here) are capped hard, l -> 3
    tanh(l / 3), so the cap decides which experts win."""
    for dtype in (np.float64, np.float32):
        c = compare("laguna", dtype, moe_router_logit_softcapping=3.0)
        fwd, bwd = tolerances("laguna", dtype)
        assert c.chosen_differ == 0 and c.state_exact
        assert c.y <= fwd and c.dx <= bwd and max(c.grads.values()) <= bwd, c


@pytest.mark.parametrize("family,fields,match", [
    ("inkling2", {"scoring_func": "relu"}, "scoring_func='relu'"),
    ("inkling2_loop", {"scoring_func": "sqrtsoftplus"}, "softmax or sigmoid only"),
    ("nemotron_h", {"mlp_bias": True}, "shared-expert biases"),
], ids=["inkling2-relu", "inkling2_loop-sqrtsoftplus", "nemotron_h-bias"])
# (nemotron_h's moe_latent_size is loadable: tests/hf/test_zero_and_joint.py)
def test_inexpressible_configs_are_refused(family, fields, match):
    from pymoe.hf.convert import family_of
    from pymoe.hf.families import Config
    with pytest.raises(ValueError, match=match):
        family_of(family).spec(Config(fields, family), None, {})
