"""The routing variants of the major MoE systems, one module per variant step (route() and
MoELayer choose them by keyword, pymoe.options), and the presets that bundle them per system:
    scores.py         2-3  sigmoid scores, selection-only expert bias, update_expert_bias
    group_limited.py  3    group-limited top-K (DeepSeek-V3)
    sinkhorn.py       3    Sinkhorn-balanced selection
    noisy.py          1-3  noisy top-K gating and its smooth load loss
    expert_choice.py  3-9  each expert takes its top-C tokens
    shared.py         11   shared (always-on) experts, optionally sigmoid-gated
    presets.py             one name per system: its conventions as route()/MoELayer keywords
"""
