"""pymoe.hf.load on save_pretrained checkpoints of softmax (C1) families, against
from_transformers on the same block: float32 params bitwise; bfloat16 against the bfloat16 block
(both widened to float32). gpt_oss: interleaved experts with biases and a router bias, stored
fused; qwen3_next: per-expert names on disk, fused back, with the gated shared expert;
granitemoeshared: the decoder layer's MoE branch from two of its modules, renamed on disk."""
from __future__ import annotations

import re

import numpy as np
import pytest
from tiny import compare, randomize, tiny_model, tolerances, torch

import pymoe.hf
from pymoe.hf.transformers_block import _find_block


def _layer_of(model, block) -> int:
    name = next(n for n, m in model.named_modules() if m is block)
    return int(re.search(r"(?:layers|blocks)\.(\d+)", name).group(1))


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_next", "granitemoeshared"])
def test_load_is_from_transformers(tmp_path, family, bf16):
    model, cfg = tiny_model(family)
    randomize(_find_block(model))
    if bf16:
        model = model.to(torch.bfloat16)
    block = _find_block(model)
    model.save_pretrained(tmp_path)
    ours = pymoe.hf.load(tmp_path, _layer_of(model, block))
    ref = pymoe.hf.from_transformers(block, cfg)
    assert ours.dtype == ref.dtype == np.float32
    assert sorted(ours.params) == sorted(ref.params)
    for name, p in ref.params.items():
        assert np.array_equal(ours.params[name], p), name
    x = np.random.default_rng(0).standard_normal((16, cfg.hidden_size)).astype(np.float32)
    assert np.array_equal(ours.forward(x), ref.forward(x))


# Config variants the default tiny configs (tests/hf/configs_softmax.py) do not reach.
_DBRX_FFN = {"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2}
VARIANTS = {
    "cohere2_sigmoid": ("cohere2_moe", {"expert_selection_fn": "sigmoid", "norm_topk_prob": True}),
    "cohere2_sigmoid_raw_sum": ("cohere2_moe", {"expert_selection_fn": "sigmoid",
                                                "norm_topk_prob": False,
                                                "shared_expert_combination_strategy": "sum"}),
    "dbrx_raw": ("dbrx", {"ffn_config": {**_DBRX_FFN, "moe_normalize_expert_weights": None}}),
    # L2-normalised gates (normalize_p=2): g = s / ||s||_2
    "dbrx_l2": ("dbrx", {"ffn_config": {**_DBRX_FFN, "moe_normalize_expert_weights": 2.0}}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variant_matches_hf(variant):
    family, overrides = VARIANTS[variant]
    c = compare(family, np.float64, **overrides)
    fwd, bwd = tolerances(family, np.float64)
    assert c.chosen_differ == 0 and c.state_exact
    assert c.y <= fwd and c.dx <= bwd and max(c.grads.values()) <= bwd, c


def test_dbrx_bad_p_is_refused():
    from pymoe.hf.convert import family_of
    from pymoe.hf.families import Config
    cfg = Config({"ffn_config": {**_DBRX_FFN, "moe_normalize_expert_weights": -1.0}}, "dbrx")
    with pytest.raises(ValueError, match="p > 0"):
        family_of("dbrx").spec(cfg, None, {})