"""pymoe.hf.load for two families of pymoe/hf/families/others.py: DeepSeek-V2 (fused experts on
disk per expert, group-limited routing, shared experts) and Ernie 4.5 (its selection bias
`moe_statics.e_score_correction_bias` [1, E]): a tiny model saved with save_pretrained (float32,
and bfloat16) loads into the same layer as from_transformers on the saved block."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from tiny import randomize, tiny_model

import pymoe.hf
from pymoe.hf.transformers_block import _find_block


def _block_and_layer(model):
    block = _find_block(model)
    name = next(n for n, m in model.named_modules() if m is block)
    return block, int(name.split("layers.")[1].split(".")[0])


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("family", ["deepseek_v2", "ernie4_5_moe"])
def test_load_equals_from_transformers(tmp_path, family, bf16):
    import torch
    model, cfg = tiny_model(family)
    block, idx = _block_and_layer(model)
    randomize(block)
    if bf16:
        model = model.to(torch.bfloat16)
        block, idx = _block_and_layer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    ours = pymoe.hf.load(tmp_path, idx)
    theirs = pymoe.hf.from_transformers(block, cfg)  # a bf16 block widened to float32
    assert ours.dtype == theirs.dtype == np.float32
    assert set(ours.params) == set(theirs.params)
    for name in theirs.params:
        assert np.array_equal(ours.params[name], theirs.params[name]), name
    if theirs.expert_bias is None:
        assert ours.expert_bias is None
    else:
        assert np.array_equal(ours.expert_bias, theirs.expert_bias)
    assert ours.hf.shapes == theirs.hf.shapes
    x = np.random.default_rng(0).standard_normal((16, cfg.hidden_size)).astype(np.float32)
    assert np.array_equal(ours.forward(x), theirs.forward(x))
