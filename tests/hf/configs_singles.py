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
