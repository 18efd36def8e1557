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
