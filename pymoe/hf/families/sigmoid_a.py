"""Sigmoid 'aux-free' families (the survey's convention C2, the DeepSeek-V3 router): s =
sigmoid(logits), rank s + b (b: a selection-only bias the training loop moves), optionally
group-limited (groups scored by their top-2 sum of s + b), gate = s, optionally renormalised,
times a scaling factor."""
from __future__ import annotations

from ._base import Config, Family, Spec, standard


def dsv3_routing(cfg: Config) -> dict:
    """The DeepseekV3TopkRouter keywords: groups from n_group / topk_group (1 group: none)."""
    groups = cfg.get("n_group", None) or 1
    kw = {"normalize": bool(cfg.get("norm_topk_prob")),
          "scaling_factor": float(cfg.get("routed_scaling_factor"))}
    if groups > 1:
        kw.update(num_groups=int(groups), topk_groups=int(cfg.get("topk_group")), group_score_k=2)
    else:
        kw.update(num_groups=None, topk_groups=None, group_score_k=None)
    return kw


def _deepseek_v3(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="deepseek-v3" if (cfg.get("n_group", 1) or 1) > 1
                    else "glm4-moe", shared="shared_experts",
                    bias="gate.e_score_correction_bias", **dsv3_routing(cfg))


FAMILIES = [
    Family("deepseek_v3", ("DeepseekV3MoE",), "deepseek-v3", "swiglu", _deepseek_v3),
]
