"""ernie4_5_vl_moe with text and vision tokens (modality_sets=2, token_types) against HF's
Ernie4_5_VLMoeMoeBlock(hidden_states, moe_mm_token_type_ids): output, each token's chosen
experts inside its own set, dx and every gradient, the vision experts' included."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import import_optional

torch = import_optional("torch", "crosscheck")

from tiny import randomize, rel, tiny_model, tolerances  # noqa: E402

import pymoe.hf  # noqa: E402
from pymoe.hf.transformers_block import _find_block  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_text_and_vision_tokens_match_hf(dtype):
    model, cfg = tiny_model("ernie4_5_vl_moe")
    block = _find_block(model).to(torch.float64 if dtype == np.float64 else torch.float32)
    randomize(block, 0)
    rng = np.random.default_rng(0)
    T, D = 48, cfg.hidden_size
    x = rng.standard_normal((T, D)).astype(dtype)
    dy = rng.standard_normal((T, D)).astype(dtype)
    types = rng.integers(0, 3, T)  # 0 text; 1 image and 2 video both route to the vision set
    xt = torch.from_numpy(x.copy())[None].requires_grad_(True)
    y_hf = block(xt, moe_mm_token_type_ids=torch.from_numpy(types)[None])
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf
    (y_hf * torch.from_numpy(dy)[None]).sum().backward()

    layer = pymoe.hf.from_transformers(block, cfg)
    y = layer.forward(x, token_types=(types != 0).astype(np.int64))
    dx = layer.backward(dy)
    E = layer.num_experts // 2
    vision = types != 0
    chosen = layer.routing.expert_index  # [T, K]
    assert (chosen[~vision] < E).all() and (chosen[vision] >= E).all()  # each in its own set
    with torch.no_grad():
        text_idx = block.text_moe.gate(xt[0][torch.from_numpy(~vision)])[2].numpy()
        vision_idx = block.vision_moe.gate(xt[0][torch.from_numpy(vision)])[2].numpy()
    np.testing.assert_array_equal(np.sort(chosen[~vision], 1), np.sort(text_idx, 1))
    np.testing.assert_array_equal(np.sort(chosen[vision], 1), np.sort(vision_idx + E, 1))

    fwd, bwd = tolerances("ernie4_5_vl_moe", dtype)
    assert rel(y, y_hf.detach().numpy()[0]) <= fwd
    assert rel(dx, xt.grad.numpy()[0]) <= bwd
    hf_grads = {k: p.grad.numpy() for k, p in block.named_parameters() if p.grad is not None}
    assert any(k.startswith("vision_moe.experts") for k in hf_grads)
    ours = pymoe.hf.grad_dict(layer)
    assert set(ours) == set(hf_grads)
    for k in hf_grads:
        assert rel(ours[k], hf_grads[k]) <= bwd, k


def test_token_types_are_checked():
    model, cfg = tiny_model("ernie4_5_vl_moe")
    layer = pymoe.hf.from_transformers(_find_block(model).double(), cfg)
    x = np.zeros((4, cfg.hidden_size))
    with pytest.raises(ValueError, match="token_types"):
        layer.forward(x, token_types=np.array([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="token_types"):
        layer.forward(x, token_types=np.array([0.0, 1, 1, 0]))
    with pytest.raises(ValueError, match="token_types"):
        layer.forward(x, token_types=np.array([0, 1]))
