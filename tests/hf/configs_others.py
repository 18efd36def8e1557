"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in pymoe/hf/families/others.py,
and the references compare() checks Switch and NLLB against (REFERENCE)."""
from __future__ import annotations

from typing import Any

# DeepSeek-V2's MLA attention at tiny sizes
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
# group_limited_greedy exercised: 4 groups of 2 experts, 2 kept; 2 shared experts (one MLP)
_DSV2 = dict(_MLA, n_shared_experts=2, n_group=4, topk_group=2, topk_method="group_limited_greedy",
             routed_scaling_factor=2.5, norm_topk_prob=True)  # norm_topk_prob: never read by HF

EXTRA: dict[str, dict] = {
    "deepseek_v2": _DSV2,
    "deepseek_ocr2": dict(_DSV2, mlp_layer_types=["sparse", "sparse"]),
    "unlimited_ocr": dict(_DSV2, mlp_layer_types=["sparse", "sparse"]),
    "mistral4": dict(_MLA, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.5),
    "mistral_large4": dict(num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8,
                           n_group=4, topk_group=2, routed_scaling_factor=1.5),
    "ernie4_5_moe": dict(moe_num_shared_experts=2),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[32, 16], head_dim=128, moe_num_shared_experts=2,
                            mlp_layer_types=["sparse", "sparse"]),
    # 64 tokens, 8 experts, top-1: capacity 6 drops tokens of the busier experts
    "switch_transformers": dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                num_decoder_layers=2, num_sparse_encoder_layers=1,
                                num_sparse_decoder_layers=1, expert_capacity=6),
    # eval capacity from expert_capacity (fraction 0): 12 slots for 128 pairs, drops exercised;
    # moe_token_dropout 0.2 (the checkpoints' value) scales the routed output by 0.8 in eval
    "nllb-moe": dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2,
                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=12,
                     moe_eval_capacity_token_fraction=0.0, moe_token_dropout=0.2),
}


def _switch_reference(block, xt) -> tuple[Any, Any]:
    """HF's SparseMLP itself; the chosen expert (before capacity) is the argmax of the router
    logits it returns (its one-hot dispatch mask has all-zero rows for dropped tokens)."""
    logits = []
    handle = block.router.register_forward_hook(lambda _m, _i, out: logits.append(out[2]))
    try:
        y = block(xt)
    finally:
        handle.remove()
    chosen = logits[0].detach().reshape(-1, logits[0].shape[-1]).argmax(-1)[:, None]
    return y, chosen.numpy()


def nllb_reference(block, xt) -> tuple[Any, Any]:
    """NllbMoeSparseMLP's output with the experts HF's router chose: HF 5.24's
    NllbMoeExperts.forward one-hots the [T, E] top-1 mask itself, so it runs experts 0 and 1
    only (tests/hf/test_hf_quirks_others.py pins that). This runs HF's router and HF's own
    expert modules: y_t = (1 - moe_token_dropout) * sum_e router_probs[t, e] * expert_e(x_t)
    over the (token, expert) pairs the router kept (router_probs > 0), as in eval mode.
    chosen: the top-1 (argmax) and top-2 (argmax of the other logits) experts before capacity."""
    import torch
    B, S, D = xt.shape
    h = xt.reshape(-1, D)
    _, router_probs, logits = block.router(h)
    y = torch.zeros_like(h)
    p = block.experts.moe_token_dropout
    for e in range(block.num_experts):
        rows = torch.nonzero(router_probs[:, e] != 0).reshape(-1)
        if rows.numel():
            out = block.experts[f"expert_{e}"](h[rows]) * router_probs[rows, e, None]
            y = y.index_add(0, rows, (out * (1 - p) if p > 0 else out).to(h.dtype))
    first = logits.argmax(-1)
    rest = logits.detach().clone()
    rest[torch.arange(rest.shape[0]), first] = float("-inf")
    chosen = torch.stack([first, rest.argmax(-1)], dim=1)
    return y.reshape(B, S, D), chosen.detach().numpy()


REFERENCE = {"switch_transformers": _switch_reference, "nllb-moe": nllb_reference}
