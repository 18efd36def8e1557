"""The single-family conventions of pymoe/hf/families/singles.py beyond test_blocks (which runs
each family's first layer): DeepSeek-V4's hash layers, and what HF's DeepSeek-V4 cannot build."""
from __future__ import annotations

import numpy as np
import pytest
from tiny import compare, tiny_model, tolerances


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_deepseek_v4_hash_layer_matches_hf(dtype):
    """A 'hash_moe' layer (DeepseekV4HashRouter): experts tid2eid[input_ids] (a random table,
    configs_singles.INPUTS), gates the renormalised sqrt-softplus scores x 1.5; pymoe's layer
    gets the table as hash_table and the ids as forward(x, token_ids=)."""
    c = compare("deepseek_v4", dtype, mlp_layer_types=["hash_moe", "moe"])
    fwd, bwd = tolerances("deepseek_v4", dtype)
    assert c.chosen_differ == 0 and c.state_exact
    assert c.y <= fwd and c.dx <= bwd and max(c.grads.values()) <= bwd, c


def test_deepseek_v4_softmax_scoring_is_not_buildable_in_hf():
    """HF quirk: the config documents scoring_func 'softmax', but ACT2FN has no 'softmax', so the
    router cannot be built (pymoe.hf maps it to score='softmax', unchecked against HF)."""
    with pytest.raises(KeyError, match="softmax"):
        tiny_model("deepseek_v4", scoring_func="softmax")
