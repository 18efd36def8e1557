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


def test_zaya_tiny_model_chooses_the_skip_expert():
    """HF rewrites a skip to expert 0 with gate 0; the cross-check is only a check of pymoe's
    null expert if some tokens choose it."""
    from configs_zero_and_joint import zaya_biases
    model, cfg = tiny_model("zaya")
    block = _find_block(model).double()
    randomize(block)
    zaya_biases(block)  # as test_blocks' reference sets them
    layer = pymoe.hf.from_transformers(block, cfg)
    layer.forward(np.random.default_rng(0).standard_normal((64, 32)))
    assert layer.null_experts == 1 and layer.num_experts == 9
    assert 0 < layer.routing.expert_load[8] < 64


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_zaya_router_state_across_layers(dtype):
    """Layer 1 reads layer 0's router state: HF's block(x, state) -> (y, next state) against
    layer.forward(x, router_state=state) and layer.router_state; backward of
    sum(y dy) + sum(next_state ds) against layer.backward(dy, d_router_state=ds), with
    layer.router_state_grad the state's gradient. HF's router RMSNorm runs in float32, so
    float64 holds float32's tolerance."""
    import torch
    from configs_zero_and_joint import zaya_biases, zaya_reference
    model, cfg = tiny_model("zaya")
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    block = model.layers[1].mlp.to(tdt)
    randomize(block, 1)
    zaya_biases(block, 1)
    rng = np.random.default_rng(1)
    T, D, R = 64, 32, 16
    x, dy = rng.standard_normal((T, D)).astype(dtype), rng.standard_normal((T, D)).astype(dtype)
    s, ds = rng.standard_normal((T, R)).astype(dtype), rng.standard_normal((T, R)).astype(dtype)
    xt = torch.from_numpy(x.copy())[None].requires_grad_(True)
    st = torch.from_numpy(s.copy())[None].requires_grad_(True)
    (y_hf, s_hf), chosen = zaya_reference(block, xt, st)
    ((y_hf * torch.from_numpy(dy)[None]).sum() + (s_hf * torch.from_numpy(ds)[None]).sum()
     ).backward()
    layer = pymoe.hf.from_transformers(block, cfg)
    assert layer.router_state_input
    y = layer.forward(x, router_state=s)
    dx = layer.backward(dy, d_router_state=ds)
    fwd, bwd = TOL[np.float32]
    assert (np.sort(layer.routing.expert_index, 1) == np.sort(chosen, 1)).all()

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())
    assert rel(y, y_hf.detach().numpy()[0]) <= fwd
    assert rel(layer.router_state, s_hf.detach().numpy()[0]) <= fwd
    assert rel(dx, xt.grad.numpy()[0]) <= bwd
    assert rel(layer.router_state_grad, st.grad.numpy()[0]) <= bwd
    ours = pymoe.hf.grad_dict(layer)
    for k, p in block.named_parameters():
        assert rel(ours[k], p.grad.numpy()) <= bwd, k
