"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in
pymoe/hf/families/singles.py, and the token ids DeepSeek-V4's hash layers route by (INPUTS)."""
from __future__ import annotations

from typing import Any

import numpy as np

EXTRA: dict[str, dict] = {
    # both layers ordinary ("moe": sqrt-softplus top-K of s + b); the hash layers are checked in
    # tests/hf/test_singles.py with mlp_layer_types=["hash_moe", "moe"]
    "deepseek_v4": dict(mlp_layer_types=["moe", "moe"]),
    # a wide relative threshold (2 * 0.25 of the best logit), so that most picks have several
    # candidates and the gates (and the router gradient) are not all 1 (0); no input jitter
    "phimoe": dict(router_jitter_noise=0.25, input_jitter_noise=0.0),
    # 16 experts: 4 keys per half; K = 2
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),
}


def _deepseek_v4_inputs(block, T: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """A hash layer routes by token id: a random tid2eid (K distinct experts per id, the table
    randomize() leaves alone, being integer) and random ids; an ordinary layer needs none."""
    if not block.is_hash:
        return {}, {}
    import torch
    V, K = block.gate.tid2eid.shape
    E = block.gate.num_experts
    table = np.stack([rng.permutation(E)[:K] for _ in range(V)])  # [V, K]
    with torch.no_grad():
        block.gate.tid2eid.copy_(torch.from_numpy(table))
    ids = rng.integers(0, V, size=T)  # [T]
    return {"input_ids": torch.from_numpy(ids)[None]}, {"token_ids": ids}


INPUTS: dict[str, Any] = {"deepseek_v4": _deepseek_v4_inputs}


def _doge_reference(block, xt) -> tuple[Any, Any]:
    """DogeCDMoE itself; its chosen experts are the indices it looks up in down_embed (read with
    a forward hook: its router is router_gate, whose output is the key logits, not experts)."""
    seen = []
    handle = block.down_embed.register_forward_hook(
        lambda _m, inp, _out: seen.append(inp[0].detach().numpy()))
    try:
        y, _ = block(xt)
    finally:
        handle.remove()
    return y, seen[0]


REFERENCE: dict[str, Any] = {"doge": _doge_reference}
