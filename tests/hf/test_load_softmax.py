"""pymoe.hf.load on save_pretrained checkpoints of softmax (C1) families, against
from_transformers on the same block: float32 params bitwise; bfloat16 against the bfloat16 block
(both widened to float32). gpt_oss: interleaved experts with biases and a router bias, stored
fused; qwen3_next: per-expert names on disk, fused back, with the gated shared expert;
granitemoeshared: the decoder layer's MoE branch from two of its modules, renamed on disk."""
from __future__ import annotations

import re

import numpy as np
import pytest
from tiny import randomize, tiny_model, torch

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
