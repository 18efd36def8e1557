"""Softmax group-limited (C3), softmax + selection bias (C4), and the encoder-decoder
capacity routers (C10 Switch, C11 NLLB).

C3, DeepSeek-V2 (deepseek_v2 and its copies deepseek_ocr2, unlimited_ocr): p = softmax(logits);
topk_method "greedy" takes the top K of p, "group_limited_greedy" first keeps the topk_group
groups with the largest max p (the rest filled with 0.0, the same as -inf for p > 0 when the kept
groups hold >= K experts); gate = p * routed_scaling_factor, never renormalised (HF never reads
norm_topk_prob). Mistral-4 (mistral4, mistral_large4): groups scored by the sum of their top-2 p,
gate = p renormalised (mistral4: when norm_topk_prob; mistral_large4: always) times the factor.
C4, Ernie 4.5: the top K of p + b (b: moe_statics.e_score_correction_bias, selection only),
gate = p renormalised. C10 Switch and C11 NLLB: per-expert two-layer relu FFNs with a capacity.
"""
from __future__ import annotations

from ..layouts import Tensor, linear, per_expert, same
from ._base import Config, Family, Spec, jitter_keywords, standard

_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def _groups(cfg: Config, score_k: int, grouped: bool) -> dict:
    """num_groups / topk_groups / group_score_k from n_group / topk_group (1 group: none)."""
    groups = cfg.get("n_group", None) or 1
    if not grouped or groups <= 1:
        return {"num_groups": None, "topk_groups": None, "group_score_k": None}
    return {"num_groups": int(groups), "topk_groups": int(cfg.get("topk_group")),
            "group_score_k": score_k}


def _deepseek_v2(cfg: Config, layer, shapes) -> Spec:
    method = cfg.get("topk_method", "greedy") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"config: {cfg.family} topk_method={method!r}: DeepseekV2TopkRouter "
                         "computes 'greedy' and 'group_limited_greedy' only")
    # norm_topk_prob is not read: HF's DeepSeek-V2 router never renormalises (docs: HF quirks)
    return standard(cfg, shapes, preset="deepseek-v2", shared="shared_experts", normalize=False,
                    scaling_factor=float(cfg.get("routed_scaling_factor")),
                    **_groups(cfg, 1, method == "group_limited_greedy"))


def _mistral4(cfg: Config, layer, shapes, always_normalize: bool = False) -> Spec:
    normalize = True if always_normalize else bool(cfg.get("norm_topk_prob"))
    return standard(cfg, shapes, preset="deepseek-v2", shared="shared_experts",
                    normalize=normalize, scaling_factor=float(cfg.get("routed_scaling_factor")),
                    **_groups(cfg, 2, True))


def _mistral_large4(cfg: Config, layer, shapes) -> Spec:
    return _mistral4(cfg, layer, shapes, always_normalize=True)


def _ernie(cfg: Config, shapes, prefix: str = "", ignored: tuple[str, ...] = ()) -> Spec:
    shared = "shared_experts" if (cfg.get("moe_num_shared_experts", 0) or 0) > 0 else None
    spec = standard(cfg, shapes, preset="ernie4.5", router=f"{prefix}gate.weight",
                    experts=f"{prefix}experts", shared=shared,
                    bias=f"{prefix}gate.moe_statics.e_score_correction_bias", k="moe_k",
                    normalize=True)
    return Spec(spec.sizes, spec.keywords, spec.tensors, ignored)


def _ernie4_5_moe(cfg: Config, layer, shapes) -> Spec:
    return _ernie(cfg, shapes)


def _ernie4_5_vl_moe(cfg: Config, layer, shapes) -> Spec:
    # text-only: Ernie4_5_VLMoeMoeBlock(hidden_states) without moe_mm_token_type_ids runs
    # text_moe + the shared experts; the vision experts are never used on that path
    return _ernie(cfg, shapes, prefix="text_moe.",
                  ignored=tuple(k for k in shapes if k.startswith("vision_moe.")))


def _activation(cfg: Config, name: str) -> str:
    act = cfg.get(name)
    if act not in _ACTIVATIONS:
        raise ValueError(f"config: {cfg.family} experts with {name}={act!r}: pymoe's plain "
                         f"forms take {', '.join(map(repr, _ACTIVATIONS))}")
    return _ACTIVATIONS[act]


def _router(cfg: Config, shapes) -> list[Tensor]:
    tensors = [linear("w_router", "router.classifier.weight")]
    if "router.classifier.bias" in shapes:
        tensors.append(same("b_router", "router.classifier.bias"))
    return tensors


def _per_expert_ffn(E: int, wi: str, wo: str, biases: bool) -> list[Tensor]:
    """experts.expert_{i}.<wi>/<wo> nn.Linear weights (and biases) -> w1 [E, D, H], w2 [E, H, D]
    (b1 [E, H], b2 [E, D])."""
    out = [per_expert("w1", f"experts.expert_{{i}}.{wi}.weight", E, lambda k: linear("w1", k)),
           per_expert("w2", f"experts.expert_{{i}}.{wo}.weight", E, lambda k: linear("w2", k))]
    if biases:
        out += [per_expert("b1", f"experts.expert_{{i}}.{wi}.bias", E, lambda k: same("b1", k)),
                per_expert("b2", f"experts.expert_{{i}}.{wo}.bias", E, lambda k: same("b2", k))]
    return out


def _switch(cfg: Config, layer, shapes) -> Spec:
    E = int(cfg.get("num_experts"))
    H, D = shapes["experts.expert_0.wi.weight"]
    kw = {"preset": "switch", "capacity": int(cfg.get("expert_capacity")), "min_capacity": 0,
          "activation": _activation(cfg, "dense_act_fn"), "aux_loss_coef": 0.0,
          "z_loss_coef": 0.0, **jitter_keywords(cfg.get("router_jitter_noise", 0.0))}
    # the router jitters hidden_states.to(router_dtype) in place: the caller's tensor, which
    # the experts read, only when the model computes in the router dtype already
    return Spec((D, H, E, 1), kw, tuple(_router(cfg, shapes) +
                                         _per_expert_ffn(E, "wi", "wo", biases=False)),
                jitter_experts_dtypes=(str(cfg.get("router_dtype", "float32")),))


def _nllb(cfg: Config, layer, shapes) -> Spec:
    """NllbMoeSparseMLP in eval mode (what from_transformers reproduces): the eval capacity
    ceil(moe_eval_capacity_token_fraction * T) (>= T: nothing drops), else expert_capacity (or
    2 ceil(T / E) when None); moe_token_dropout p scales the routed output by 1 - p."""
    E = int(cfg.get("num_experts"))
    H, D = shapes["experts.expert_0.fc1.weight"]
    policy = cfg.get("second_expert_policy")
    if policy != "all":
        raise ValueError(f"config: nllb-moe second_expert_policy={policy!r} draws from torch's "
                         "random generator (and 'random' overwrites the renormalised second "
                         "gate with the raw one); pymoe reproduces 'all' only")
    kw = {"preset": "nllb-moe", "activation": _activation(cfg, "activation_function"),
          "aux_loss_coef": 0.0, "z_loss_coef": 0.0,
          "priority": "score" if cfg.get("batch_prioritized_routing") else "choice"}
    if cfg.get("normalize_router_prob_before_dropping"):
        kw.update(normalize=True, renormalize_after_drop=False)
    else:
        kw.update(normalize=False, renormalize_after_drop=True)
    frac = float(cfg.get("moe_eval_capacity_token_fraction") or 0.0)
    fixed = cfg.get("expert_capacity", None)
    if frac >= 1.0:
        kw["capacity_factor"] = None  # C = ceil(frac * T) >= T: nothing drops
    elif frac > 0.0:  # ceil(frac * T) = ceil(K * T * cf / E) with cf = frac * E / K
        kw.update(capacity_factor=frac * E / 2, capacity_rule="k_ceil")
    elif fixed is not None:
        kw["capacity"] = int(fixed)
    else:
        kw.update(capacity_factor=1.0, capacity_rule="tutel")  # 2 * ceil(T / E)
    p = float(cfg.get("moe_token_dropout") or 0.0)
    if p > 0.0:
        kw["scaling_factor"] = 1.0 - p
    return Spec((D, H, E, 2), kw, tuple(_router(cfg, shapes) +
                                         _per_expert_ffn(E, "fc1", "fc2", biases=True)))


_C3 = "deepseek-v2"
FAMILIES = [
    Family("deepseek_v2", ("DeepseekV2Moe",), _C3, "swiglu", _deepseek_v2,
           note="norm_topk_prob is never read: gates are p * routed_scaling_factor"),
    Family("deepseek_ocr2", ("DeepseekOcr2TextMoe",), _C3, "swiglu", _deepseek_v2,
           note="the DeepSeek-V2 block (text model)"),
    Family("unlimited_ocr", ("UnlimitedOcrTextMoe",), _C3, "swiglu", _deepseek_v2,
           note="the DeepSeek-V2 block (text model)"),
    Family("mistral4", ("Mistral4MoE",), _C3, "swiglu", _mistral4, router_dtype="model",
           note="groups scored by their top-2 sum; the router runs in the model dtype"),
    Family("mistral_large4", ("MistralLarge4TextMoE",), _C3, "swiglu", _mistral_large4,
           note="groups scored by their top-2 sum; gates always renormalised"),
    # on disk (the original checkpoints, and save_pretrained) the bias sits beside the gate
    Family("ernie4_5_moe", ("Ernie4_5_MoeSparseMoeBlock",), "ernie4.5", "swiglu", _ernie4_5_moe,
           disk_renames={"moe_statics.e_score_correction_bias":
                         "gate.moe_statics.e_score_correction_bias"}),
    Family("ernie4_5_vl_moe", ("Ernie4_5_VLMoeMoeBlock",), "ernie4.5", "swiglu", _ernie4_5_vl_moe,
           note="text tokens only (no moe_mm_token_type_ids): text_moe + shared experts; the "
                "vision experts are left out"),
    Family("switch_transformers", ("SwitchTransformersSparseMLP",), "switch", "relu", _switch,
           note="the sparse MLP's output (not SwitchTransformersLayerFF's norm + residual); one "
                "sequence: HF's capacity counts per sequence"),
    Family("nllb-moe", ("NllbMoeSparseMLP",), "nllb-moe", "relu", _nllb,
           note="eval mode; compared against the correct experts (HF 5.24's NllbMoeExperts "
                "runs experts 0 and 1 only)"),
]
