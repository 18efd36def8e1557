"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in
pymoe/hf/families/zero_and_joint.py, and the hooks compare() runs them with."""
from __future__ import annotations

from typing import Any

EXTRA: dict[str, dict] = {
    # 8 real + 4 identity experts, top-2; MLA attention at tiny sizes
    "longcat_flash": dict(num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8,
                          zero_expert_num=4, routed_scaling_factor=6.0),
    # 8 routed + 2 router-scored shared experts, top-2, route_scale 8 (the defaults)
    "inkling": dict(n_shared_experts=2, route_scale=8.0),
    # 8 experts + the skip expert, top-1 (ZayaConfig allows no other K), router width 16
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=16),
}

# family -> the model_type of its tiny config (the family's name is its transformers directory)
MODEL_TYPES: dict[str, str] = {"inkling": "inkling_text"}
MODELS: dict[str, str] = {"inkling": "InklingForCausalLM"}


def _longcat(block, xt) -> Any:
    """HF's LongcatFlashMoE itself, after zeroing the gate_up_proj rows of the Z identity
    experts, which HF allocates and never reads (pymoe has no parameters for them and writes
    them as 0, so the state-dict round trip compares like with like)."""
    import torch
    with torch.no_grad():
        block.experts.gate_up_proj[block.experts.num_routed_experts:] = 0
    return block(xt)


BRANCHES = {"longcat_flash": _longcat}


def zaya_biases(block, seed: int = 0) -> None:
    """A router that spreads the tokens: tiny.randomize gives 1-D tensors std 0.5, so the
    fc1/fc2 biases would swamp their normalised inputs and every token would route alike, and
    balancing_biases of std 0.5 would decide alone over 9 probabilities near 0.1 (the skip
    expert never chosen). Here the fc biases are scaled by 0.1, out_proj by 8 (logits of std
    ~2) and balancing_biases ~ N(0, 0.03): the probabilities decide, the bias moves close calls."""
    import torch
    g = torch.Generator().manual_seed(seed)
    mlp = block.gate.router_mlp
    with torch.no_grad():
        mlp.fc1.bias.mul_(0.1)
        mlp.fc2.bias.mul_(0.1)
        mlp.out_proj.weight.mul_(8.0)
        b = block.gate.balancing_biases
        b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype) * 0.03)


def zaya_reference(block, xt, state=None) -> tuple[Any, Any]:
    """HF's ZayaSparseMoeBlock itself (its output; the router state is its second output); the
    chosen experts before HF rewrites a skip (index E) to expert 0: the top K of its router's
    softmax plus balancing_biases, as ZayaRouter ranks them (checked against HF's indices
    wherever no skip was chosen)."""
    import torch
    seen = []
    handle = block.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        y = block(xt, state)
    finally:
        handle.remove()
    logits, _, hf_index = seen[0][0], seen[0][1], seen[0][2]
    probs = torch.softmax(logits.detach(), dim=-1).to(torch.float32) + block.gate.balancing_biases
    chosen = torch.topk(probs, block.gate.top_k, dim=-1)[1]
    E = block.gate.num_experts
    kept = chosen != E
    assert torch.equal(chosen[kept], hf_index.reshape(chosen.shape)[kept])
    return y, chosen.numpy()


def _zaya_reference(block, xt) -> tuple[Any, Any]:
    zaya_biases(block)
    y, chosen = zaya_reference(block, xt)
    return y[0], chosen


REFERENCE = {"zaya": _zaya_reference}

# family -> {dtype: (forward, gradients)}. inkling float32: the learned global_scale's gradient is
# one sum over every token's K routed and S shared gate terms, which cancel; its float32 round-off
# moves with the BLAS kernel's blocking of the expert outputs (3.2e-5 relative measured under
# OpenBLAS's Haswell kernel, 5e-6 under SkylakeX), so gradients are held to 1e-4 there
TOL: dict[str, dict[str, tuple[float, float]]] = {"inkling": {"float32": (2e-5, 1e-4)}}
