"""Sigmoid 'aux-free' families (the survey's convention C2), second half: the DeepSeek-V3 router
(s = sigmoid(logits), rank s + b, optionally group-limited, gate = s, optionally renormalised,
times a scaling factor) with the variants these families add: the scaling applied to the summed
routed output (laguna, minimax_m3_vl, step3p7: the same maths), the bias kept on the block
(hy_v3, minimax_m2, lfm2_moe), clamped / softcapped / gpt-oss / relu^2 experts, Llama 4's gate
on the expert input.

muse_spark (a latent MoE on multiplied logits) is in zero_and_joint.py.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..layouts import Tensor, flat, linear, mlp_linear, stacked
from ._base import Config, Family, Spec, standard
from .sigmoid_a import dsv3_routing

# the largest finite float32: a clamp at it is the identity, bit for bit, on every finite
# float32 (and on every float64 below 3.4e38); a float32 layer keeps it finite
_NO_LIMIT = float(np.finfo(np.float32).max)


def _pick(cfg: Config, *names: str, default: Any = None) -> Any:
    """The first of names the config has (config.json / to_dict keep the stored names of fields
    an attribute_map aliases: kimi_linear's num_expert_group for n_group)."""
    for n in names:
        if n in cfg.fields:
            return cfg.fields[n]
    if default is None:
        return cfg.get(names[0])
    return default


def _dsv3(cfg: Config, **renames: str) -> tuple[str, dict]:
    """(preset, routing keywords) of a DeepseekV3TopkRouter copy; renames: DSv3 name -> this
    family's stored name."""
    fields = dict(cfg.fields)
    for std, own in renames.items():
        if own in fields:
            fields[std] = fields[own]
    c = Config(fields, cfg.family)
    groups = c.get("n_group", None) or 1
    return ("deepseek-v3" if groups > 1 else "glm4-moe"), dsv3_routing(c)


def _dsv3_shared(cfg: Config, layer, shapes, **keywords) -> Spec:
    preset, kw = _dsv3(cfg)
    return standard(cfg, shapes, preset=preset, shared="shared_experts",
                    bias="gate.e_score_correction_bias", **kw, **keywords)


def _kimi_linear(cfg: Config, layer, shapes) -> Spec:
    preset, kw = _dsv3(cfg, n_group="num_expert_group", norm_topk_prob="moe_renormalize")
    return standard(cfg, shapes, preset=preset, shared="shared_experts",
                    bias="gate.e_score_correction_bias",
                    k="num_experts_per_token" if "num_experts_per_token" in cfg.fields
                    else "num_experts_per_tok", **kw)


def _solar_open(cfg: Config, layer, shapes) -> Spec:
    return _dsv3_shared(cfg, layer, shapes)


def _mimo_v2_flash(cfg: Config, layer, shapes) -> Spec:
    preset, kw = _dsv3(cfg)  # DeepseekV3MoE without its shared experts
    return standard(cfg, shapes, preset=preset, bias="gate.e_score_correction_bias", **kw)


def _hy_v4(cfg: Config, layer, shapes) -> Spec:
    # routed experts clamped (silu(min(g, L)) * clip(u, +-L)); the shared MLP is plain SwiGLU,
    # which the clamped form computes exactly with a limit above every finite value
    return _dsv3_shared(cfg, layer, shapes, form="swiglu_clamped",
                        swiglu_limit=float(cfg.get("swiglu_limit")), shared_swiglu_limit=_NO_LIMIT)


def _nemotron_h(cfg: Config, layer, shapes) -> Spec:
    if cfg.get("mlp_bias", False):
        raise ValueError("config: nemotron_h with mlp_bias=True has shared-expert biases, which "
                         "pymoe's shared experts do not have")
    if cfg.get("mlp_hidden_act") != "relu2":
        raise ValueError(f"config: nemotron_h experts with mlp_hidden_act="
                         f"{cfg.get('mlp_hidden_act')!r}: only 'relu2' is mapped")
    preset, kw = _dsv3(cfg)
    E, H, De = shapes["experts.up_proj"]  # De: moe_latent_size when set, else D
    Hs, D = shapes["shared_experts.up_proj.weight"]
    tensors: tuple[Tensor, ...] = (
        linear("w_router", "gate.weight"), stacked("w1", "experts.up_proj"),
        stacked("w2", "experts.down_proj"),
        mlp_linear("shared_w1", "shared_experts.up_proj.weight"),
        mlp_linear("shared_w2", "shared_experts.down_proj.weight"),
        flat("expert_bias", "gate.e_score_correction_bias", buffer=True))
    latent: dict[str, Any] = {}
    if cfg.get("moe_latent_size", None) is not None:  # the experts run in the latent space
        tensors += (linear("w_latent_in", "fc1_latent_proj.weight"),
                    linear("w_latent_out", "fc2_latent_proj.weight"))
        latent = {"latent_dim": De}
    return Spec((D, H, E, int(cfg.get("num_experts_per_tok"))),
                {"preset": preset, "capacity_factor": None, "activation": "relu2",
                 "aux_loss_coef": 0.0, "z_loss_coef": 0.0, "num_shared_experts": 1,
                 "shared_d_hidden": Hs, "shared_expert_gate": False, **kw, **latent}, tensors)


def _sigmoid_bias(normalize: bool, scaling: float | None) -> dict:
    """Sigmoid + selection bias without groups (the DSv3 router at n_group = 1)."""
    return {"normalize": normalize, "scaling_factor": scaling, "num_groups": None,
            "topk_groups": None, "group_score_k": None}


def _hy_v3(cfg: Config, layer, shapes) -> Spec:
    kw = _sigmoid_bias(True, float(cfg.get("router_scaling_factor")))
    if cfg.get("enable_moe_fp32_combine", False):
        kw["shared_sum_fp32"] = True
    return standard(cfg, shapes, preset="glm4-moe", shared="shared_experts",
                    bias="e_score_correction_bias", **kw)


def _inkling2(cfg: Config, layer, shapes) -> Spec:
    score = cfg.get("scoring_func", "sigmoid")
    if score != "sigmoid":
        raise ValueError(f"config: {cfg.family} with scoring_func={score!r}: pymoe scores by "
                         "softmax or sigmoid only (the router is ACT2FN[scoring_func])")
    scale = _pick(cfg, "route_scale", "routed_scaling_factor")
    caps = (float(cfg.get("mlp_gate_softcap")), float(cfg.get("mlp_up_softcap")))
    return standard(cfg, shapes, preset="glm4-moe", bias="gate.e_score_correction_bias",
                    form="swiglu_softcap", swiglu_softcap=caps, num_shared_experts=0,
                    **_sigmoid_bias(True, float(scale)))


def _laguna(cfg: Config, layer, shapes) -> Spec:
    cap = cfg.get("moe_router_logit_softcapping", 0.0) or 0.0
    if cfg.get("moe_apply_router_weight_on_input", False):
        raise ValueError("config: laguna with moe_apply_router_weight_on_input=True is not mapped")
    # the scaling multiplies the summed routed output: the same as scaling each gate
    return standard(cfg, shapes, preset="glm4-moe", shared="shared_experts",
                    bias="gate.e_score_correction_bias",
                    router_softcap=float(cap) if cap > 0 else None,
                    **_sigmoid_bias(True, float(cfg.get("moe_routed_scaling_factor"))))


def _lfm2_moe(cfg: Config, layer, shapes) -> Spec:
    bias = "expert_bias" if cfg.get("use_expert_bias") else None
    norm = bool(cfg.get("norm_topk_prob"))
    kw = _sigmoid_bias(norm, float(cfg.get("routed_scaling_factor")))
    if norm:  # Lfm2MoeSparseMoeBlock.route_tokens_to_experts: / (sum + 1e-6)
        kw["normalize_eps"] = 1e-6
    return standard(cfg, shapes, preset="glm4-moe", bias=bias, form="swiglu",
                    num_shared_experts=0, **kw)


def _llama4(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="llama4", router="router.weight", transposed=True,
                    shared="shared_expert")


def _minimax_m2(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="glm4-moe", bias="e_score_correction_bias",
                    num_shared_experts=0, **_sigmoid_bias(True, None))


def _minimax_m3_vl(cfg: Config, layer, shapes) -> Spec:
    s = standard(cfg, shapes, preset="glm4-moe", bias="gate.e_score_correction_bias",
                 form="swiglu_oai", swiglu_limit=float(cfg.get("swiglu_limit")),
                 swiglu_alpha=float(cfg.get("swiglu_alpha")),
                 **_sigmoid_bias(True, float(cfg.get("routed_scaling_factor"))))
    # the shared MLP: one fused gate_up_proj nn.Linear [2Hs, D] (gate rows first), the same
    # clamped gpt-oss form as the experts
    g = "shared_experts.gate_up_proj.weight"
    tensors = s.tensors + (mlp_linear("shared_w1", g),
                           mlp_linear("shared_w2", "shared_experts.down_proj.weight"))
    return Spec(s.sizes, {**s.keywords, "num_shared_experts": 1,
                          "shared_d_hidden": shapes[g][0] // 2}, tensors)


def _step3p7_limit(limits, layer, what: str) -> float:
    """The layer's limit from a per-layer list (0 / None / no list: no clamp -> 0.0)."""
    if not limits:
        return 0.0
    values = {float(v or 0.0) for v in limits}
    if layer is None:
        if len(values) > 1:
            raise ValueError(f"layer: step3p7's {what} differ by layer ({list(limits)}) and the "
                             "block does not say which layer it is; pass the decoder layer to "
                             "from_transformers, or the layer index to load")
        return values.pop()
    return float(limits[layer] or 0.0)


def _step3p7(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="glm4-moe", shared="shared_experts",
                    bias="gate.e_score_correction_bias", form="swiglu_clamp_after",
                    swiglu_limit=_step3p7_limit(cfg.get("swiglu_limits", None), layer,
                                                "swiglu_limits"),
                    shared_swiglu_limit=_step3p7_limit(cfg.get("swiglu_limits_shared", None),
                                                       layer, "swiglu_limits_shared"),
                    **_sigmoid_bias(True, float(cfg.get("moe_router_scaling_factor"))))


# transformers' conversion_mapping for hy_v3 (save_pretrained writes the in-memory names; the
# Hub's checkpoints the original ones)
_HY_V3_DISK = {"expert_bias": "e_score_correction_bias", "router.gate.weight": "gate.weight",
               **{f"shared_mlp.{p}.weight": f"shared_experts.{p}.weight"
                  for p in ("gate_proj", "up_proj", "down_proj")}}

FAMILIES = [
    Family("hy_v3", ("HYV3MoE",), "glm4-moe", "swiglu", _hy_v3,
           disk_renames=_HY_V3_DISK,
           note="sigmoid + block-level bias, always renormalised, router_scaling_factor; "
           "enable_moe_fp32_combine -> shared_sum_fp32 (HF's float32 combine also rounds a "
           "float64 model's output to float32)"),
    Family("hy_v4", ("HYV4MoE",), "glm4-moe", "swiglu_clamped", _hy_v4,
           note="routed experts clamped at swiglu_limit, the shared MLP unclamped"),
    Family("hy_v4_vl", ("HYV4VLMoE",), "glm4-moe", "swiglu_clamped", _hy_v4,
           note="as hy_v4"),
    Family("inkling2", ("Inkling2SparseMoeBlock",), "glm4-moe", "swiglu_softcap", _inkling2,
           note="scoring_func other than sigmoid refused; HF computes the form and the sum in "
           "float32"),
    Family("inkling2_loop", ("Inkling2LoopSparseMoeBlock",), "glm4-moe", "swiglu_softcap",
           _inkling2, note="as inkling2"),
    Family("kimi_linear", ("KimiLinearMoE",), "glm4-moe", "swiglu", _kimi_linear),
    Family("laguna", ("LagunaSparseMoeBlock",), "glm4-moe", "swiglu", _laguna,
           note="moe_router_logit_softcapping -> router_softcap; the scaling on the summed routed "
           "output is pymoe's scaling_factor"),
    Family("lfm2_moe", ("Lfm2MoeSparseMoeBlock",), "glm4-moe", "swiglu", _lfm2_moe,
           note="HF renormalises by sum + 1e-6: normalize_eps=1e-6",
           router_dtype="model", disk_blocks=("feed_forward",)),
    Family("llama4", ("Llama4TextMoe",), "llama4", "swiglu", _llama4,
           disk_blocks=("feed_forward",)),
    Family("mimo_v2_flash", ("MiMoV2FlashMoE",), "glm4-moe", "swiglu", _mimo_v2_flash),
    Family("minimax_m2", ("MiniMaxM2SparseMoeBlock",), "glm4-moe", "swiglu", _minimax_m2),
    Family("minimax_m3_vl", ("MiniMaxM3VLSparseMoeBlock",), "glm4-moe", "swiglu_oai",
           _minimax_m3_vl, note="gpt-oss clamped form, concatenated gate|up; the shared MLP in "
           "the same form; routed_scaling_factor on the summed routed output"),
    Family("nemotron_h", ("NemotronHMoE",), "glm4-moe", "relu2", _nemotron_h,
           note="non-gated relu^2 experts and shared MLP; moe_latent_size: latent_dim",
           disk_blocks=("mixer",)),
    Family("solar_open", ("SolarOpenMoE",), "glm4-moe", "swiglu", _solar_open),
    Family("step3p7", ("Step3p7SparseMoeBlock",), "glm4-moe", "swiglu_clamp_after", _step3p7,
           note="per-layer swiglu_limits / swiglu_limits_shared (0 or none: no clamp)"),
]
