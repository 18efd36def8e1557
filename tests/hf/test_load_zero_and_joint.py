"""pymoe.hf.load on save_pretrained checkpoints of the zero_and_joint families: the layer it reads from
disk (per-expert names fused, renamed tensors put back in the block) equals from_transformers
on the same block, in float32 (bitwise) and bfloat16 (against the bf16 block widened)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import import_optional

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")
from tiny import randomize, tiny_model  # noqa: E402

import pymoe.hf  # noqa: E402
from pymoe.hf.transformers_block import _find_block  # noqa: E402

FAMILIES = ["inkling", "longcat_flash", "muse_spark", "zaya"]


def _prepare(family, block) -> None:
    """What test_blocks' hooks set: LongCat's unused gate_up_proj rows 0 (pymoe writes them as
    0), Zaya's router spread (configs_zero_and_joint.zaya_biases)."""
    from configs_zero_and_joint import zaya_biases
    if family == "longcat_flash":
        with torch.no_grad():
            block.experts.gate_up_proj[block.experts.num_routed_experts:] = 0
    if family == "zaya":
        zaya_biases(block)


def _layer_of(model, block) -> int:
    name = next(n for n, m in model.named_modules() if m is block)
    return int(name.split("layers.")[1].split(".")[0])


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_load_equals_from_transformers(family, bf16, tmp_path):
    model, cfg = tiny_model(family)
    block = _find_block(model)
    randomize(block, 1)
    _prepare(family, block)
    if bf16:
        model = model.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    ref = pymoe.hf.from_transformers(block, cfg)  # a bf16 block is widened to float32
    ours = pymoe.hf.load(tmp_path, _layer_of(model, block))
    assert ours.dtype == ref.dtype == np.float32
    assert set(ours.params) == set(ref.params)
    for k in ref.params:
        assert np.array_equal(ours.params[k], ref.params[k]), k
    assert np.array_equal(ours.expert_bias, ref.expert_bias)
    assert ours.options == ref.options
    sd, theirs = pymoe.hf.state_dict(ours), block.state_dict()
    assert set(sd) == set(theirs)  # (load keeps the order on disk)
    for k, v in theirs.items():
        assert np.array_equal(sd[k], v.float().numpy()), k
    x = np.random.default_rng(0).standard_normal((16, cfg.hidden_size)).astype(np.float32)
    assert np.array_equal(ours.forward(x), ref.forward(x))
