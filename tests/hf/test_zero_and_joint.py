"""The families of pymoe/hf/families/zero_and_joint.py beyond test_blocks: the mechanisms are
exercised by the tiny models (identity experts chosen), and NemotronH's optional latent
projection (moe_latent_size) against HF's own block."""
from __future__ import annotations

import numpy as np
import pytest
from tiny import TOL, compare, randomize, tiny_model

import pymoe.hf
from pymoe.hf.transformers_block import _find_block


def test_longcat_tiny_model_routes_to_identity_experts():
    """The cross-check means something only if tokens choose the Z identity experts."""
    model, cfg = tiny_model("longcat_flash")
    block = _find_block(model).double()
    randomize(block)
    layer = pymoe.hf.from_transformers(block, cfg)
    layer.forward(np.random.default_rng(0).standard_normal((64, 32)))
    assert layer.identity_experts == 4
    assert layer.routing.expert_load[8:].sum() >= 8  # of 128 pairs


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_nemotron_h_latent_projection(dtype):
    """moe_latent_size=16: fc1_latent_proj / fc2_latent_proj around the experts (latent_dim).
    HF's router runs in float32, so float64 holds float32's tolerance."""
    c = compare("nemotron_h", dtype, moe_latent_size=16)
    fwd, bwd = TOL[np.float32]
    assert c.chosen_differ == 0 and c.state_exact
    assert "fc1_latent_proj.weight" in c.grads
    assert c.y <= fwd and c.dx <= bwd and max(c.grads.values()) <= bwd, c
