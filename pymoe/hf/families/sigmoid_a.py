"""Sigmoid 'aux-free' families (the survey's convention C2, the DeepSeek-V3 router): s =
sigmoid(logits), rank s + b (b: a selection-only bias the training loop moves), optionally
group-limited (groups scored by their top-2 sum of s + b), gate = s, optionally renormalised,
times a scaling factor."""
from __future__ import annotations

from ..layouts import same
from ._base import Config, Family, Spec, standard


def dsv3_routing(cfg: Config, *, n_group: str = "n_group", norm: str = "norm_topk_prob",
                 scale: str | None = "routed_scaling_factor") -> dict:
    """The DeepseekV3TopkRouter keywords: groups from n_group / topk_group (1 group, or None:
    none). The field names are the config's own (bailing_hybrid spells them differently);
    scale None: no scaling factor."""
    groups = cfg.get(n_group, None) or 1
    kw = {"normalize": bool(cfg.get(norm)),
          "scaling_factor": None if scale is None else float(cfg.get(scale))}
    if groups > 1:
        kw.update(num_groups=int(groups), topk_groups=int(cfg.get("topk_group")), group_score_k=2)
    else:
        kw.update(num_groups=None, topk_groups=None, group_score_k=None)
    return kw


def _preset(kw: dict) -> str:
    """deepseek-v3 when the router is group-limited, glm4-moe (its n_group = 1 form) when not."""
    return "deepseek-v3" if kw["num_groups"] else "glm4-moe"


def _dsv3_like(cfg: Config, shapes, **routing_fields) -> Spec:
    """The DeepseekV3MoE layout: router `gate` (weight + e_score_correction_bias buffer),
    fused experts, one ungated shared MLP `shared_experts`."""
    kw = dsv3_routing(cfg, **routing_fields)
    return standard(cfg, shapes, preset=_preset(kw), shared="shared_experts",
                    bias="gate.e_score_correction_bias", **kw)


def _deepseek_v3(cfg: Config, layer, shapes) -> Spec:
    return _dsv3_like(cfg, shapes)


def _afmoe(cfg: Config, layer, shapes) -> Spec:
    """AfmoeTokenChoiceRouter: no groups, always renormalised, times route_scale; the bias is
    the block's own `expert_bias` (a Parameter without grad)."""
    return standard(cfg, shapes, preset="glm4-moe", router="router.gate.weight",
                    shared="shared_experts", bias="expert_bias", normalize=True,
                    scaling_factor=float(cfg.get("route_scale")), num_groups=None,
                    topk_groups=None, group_score_k=None)


def _axk1(cfg: Config, layer, shapes) -> Spec:
    """DeepSeek-V3 plus an RMSNorm of the block output (`post_mlp_layernorm`)."""
    spec = _dsv3_like(cfg, shapes)
    return Spec(spec.sizes, {**spec.keywords, "post_norm": True,
                             "post_norm_eps": float(cfg.get("rms_norm_eps"))},
                spec.tensors + (same("post_norm_weight", "post_mlp_layernorm.weight"),),
                spec.ignored)


def _axk2(cfg: Config, layer, shapes) -> Spec:
    """AXK2TopkRouter: DeepSeek-V3 without groups when n_group is None (its default). With groups
    it fills the masked groups' s + b with 0.0, not -inf (group_fill=0.0): an expert of a dropped
    group still wins over a kept one whose s + b < 0. It renormalises by sum + 1e-20."""
    spec = _dsv3_like(cfg, shapes)
    kw = dict(spec.keywords)
    if kw["num_groups"]:
        kw["group_fill"] = 0.0
    if kw["normalize"]:
        kw["normalize_eps"] = 1e-20
    return Spec(spec.sizes, kw, spec.tensors, spec.ignored)


def _bailing_hybrid(cfg: Config, layer, shapes) -> Spec:
    """DeepSeek-V3; the config stores n_group, norm_topk_prob, num_experts_per_tok and
    n_shared_experts as num_expert_group, moe_renormalize, num_experts_per_token and
    num_shared_experts (its attribute_map)."""
    kw = dsv3_routing(cfg, n_group="num_expert_group", norm="moe_renormalize")
    return standard(cfg, shapes, preset=_preset(kw), shared="shared_experts",
                    bias="gate.e_score_correction_bias", k="num_experts_per_token", **kw)


def _beam(cfg: Config, layer, shapes) -> Spec:
    """BeamTopKRouter (DeepSeek-V3 without the scaling) and no shared experts; BeamMoE scales
    the summed expert output by routed_scaling_factor, which is the same as scaling the gates."""
    kw = dsv3_routing(cfg)
    return standard(cfg, shapes, preset=_preset(kw), bias="gate.e_score_correction_bias", **kw)


def _flint(cfg: Config, layer, shapes) -> Spec:
    """FlintTopKRouter: top-K of sigmoid(logits), no bias, no groups, no scaling; one ungated
    shared MLP `shared_expert`."""
    return standard(cfg, shapes, preset="glm4-moe", shared="shared_expert",
                    normalize=bool(cfg.get("norm_topk_prob")), scaling_factor=None,
                    num_groups=None, topk_groups=None, group_score_k=None)


def _glm5_next(cfg: Config, layer, shapes) -> Spec:
    """DeepSeek-V3 routing; experts and the shared MLP silu(min(g, L)) * clip(u, -L, L)."""
    kw = dsv3_routing(cfg)
    return standard(cfg, shapes, preset=_preset(kw), shared="shared_experts",
                    bias="gate.e_score_correction_bias", form="swiglu_clamped",
                    swiglu_limit=float(cfg.get("swiglu_limit")), **kw)


FAMILIES = [
    Family("deepseek_v3", ("DeepseekV3MoE",), "deepseek-v3", "swiglu", _deepseek_v3),
    Family("afmoe", ("AfmoeSparseMoeBlock",), "glm4-moe", "swiglu", _afmoe,
           note="route_scale as scaling_factor; always renormalised"),
    Family("axk1", ("AXK1MoE",), "deepseek-v3", "swiglu", _axk1,
           note="post_norm: the block's post_mlp_layernorm",
           disk_renames={"../post_mlp_layernorm.weight": "post_mlp_layernorm.weight"}),
    Family("axk2", ("AXK2MoE",), "glm4-moe", "swiglu", _axk2,
           note="with groups HF fills masked groups with 0.0 (group_fill=0.0)"),
    Family("bailing_hybrid", ("BailingHybridMoE",), "deepseek-v3", "swiglu", _bailing_hybrid,
           disk_renames={"gate.expert_bias": "gate.e_score_correction_bias"}),
    Family("beam", ("BeamMoE",), "deepseek-v3", "swiglu", _beam,
           note="scaling applied to the summed expert output; no shared experts"),
    Family("deepseek_v32", ("DeepseekV32MoE",), "deepseek-v3", "swiglu", _deepseek_v3),
    Family("dots1", ("Dots1MoE",), "glm4-moe", "swiglu", _deepseek_v3,
           note="n_group 1; norm_topk_prob False by default"),
    Family("dots3_note", ("Dots3NoteTextMoE",), "glm4-moe", "swiglu", _deepseek_v3,
           note="the text model's MoE (the vision tower's Dots3NoteVisionMoE is not covered)"),
    Family("exaone_moe", ("ExaoneMoeSparseMoEBlock",), "glm4-moe", "swiglu", _deepseek_v3,
           disk_renames={"e_score_correction_bias": "gate.e_score_correction_bias"}),
    Family("flint", ("FlintSparseMoeBlock",), "glm4-moe", "swiglu", _flint,
           note="no selection bias, no scaling"),
    Family("glm4_moe", ("Glm4MoeMoE",), "glm4-moe", "swiglu", _deepseek_v3),
    Family("glm4_moe_lite", ("Glm4MoeLiteMoE",), "glm4-moe", "swiglu", _deepseek_v3),
    Family("glm4v_moe", ("Glm4vMoeTextMoE",), "glm4-moe", "swiglu", _deepseek_v3),
    Family("glm5_next", ("Glm5NextTextMoE",), "glm4-moe", "swiglu_clamped", _glm5_next,
           note="experts and shared MLP clamped at swiglu_limit"),
    Family("glm_moe_dsa", ("GlmMoeDsaMoE",), "glm4-moe", "swiglu", _deepseek_v3),
]
