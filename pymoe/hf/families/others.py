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

import numpy as np

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
    """Ernie4_5_VLMoeMoeBlock: text_moe and vision_moe, two Ernie sparse blocks of E experts
    each (their own router, bias and expert width moe_intermediate_size[0] / [1]), chosen by
    moe_mm_token_type_ids (0: text, else vision), plus shared experts on every token. pymoe:
    one layer of 2E experts in modality_sets=2 (forward(x, token_types=)); the narrower set's
    experts are zero-padded to the wider width, which adds exactly 0 to every output and every
    gradient (silu(0) * 0 = 0), and the padding must stay 0 to be written back."""
    base = _ernie(cfg, shapes, prefix="text_moe.")
    E = shapes["text_moe.experts.gate_up_proj"][0]
    h = (shapes["text_moe.experts.down_proj"][2], shapes["vision_moe.experts.down_proj"][2])
    H = max(h)
    sets = ("text_moe.", "vision_moe.")
    tensors = [_modality_router(sets), _modality_bias(sets),
               _modality_gate_up(sets, h, H), _modality_down(sets, h, H)]
    tensors += [t for t in base.tensors if not t.keys[0].startswith("text_moe.")]
    D = base.sizes[0]
    return Spec((D, H, 2 * E, base.sizes[3]), {**base.keywords, "modality_sets": 2},
                tuple(tensors))


def _unpadded(p: np.ndarray, keep: tuple[slice, ...], what: str) -> np.ndarray:
    """p[keep], checking that what lies outside keep (the zero padding) is still 0."""
    rest = p.copy()
    rest[keep] = 0
    if np.any(rest != 0):
        raise ValueError(f"layer: params['{what}'] has non-zero entries in the zero padding of "
                         "ernie4_5_vl_moe's narrower expert set; the HF block cannot hold them")
    return p[keep]


def _modality_router(sets) -> Tensor:
    """Each set's router nn.Linear [E, D] -> w_router [D, 2E] (text columns, then vision)."""
    def to_hf(p):
        E = p.shape[1] // 2
        return p[:, :E].T.copy(), p[:, E:].T.copy()
    return Tensor("w_router", tuple(f"{m}gate.weight" for m in sets),
                  lambda a, b: np.concatenate([a.T, b.T], axis=1), to_hf)


def _modality_bias(sets) -> Tensor:
    def to_hf(p):
        E = p.shape[0] // 2
        return p[:E].copy(), p[E:].copy()
    return Tensor("expert_bias", tuple(f"{m}gate.moe_statics.e_score_correction_bias"
                                       for m in sets),
                  lambda a, b: np.concatenate([a.reshape(-1), b.reshape(-1)]), to_hf,
                  buffer=True)


def _modality_gate_up(sets, h: tuple[int, int], H: int) -> Tensor:
    """gate_up_proj [E, 2h_m, D] of each set -> w1 [2E, D, 2H]: gate columns 0..h_m-1, up
    columns H..H+h_m-1, zeros between."""
    def to_pymoe(*arrays):
        out = []
        for a, hm in zip(arrays, h):
            w = a.transpose(0, 2, 1)  # [E, D, 2h]
            pad = np.zeros(w.shape[:2] + (H - hm,), w.dtype)
            out.append(np.concatenate([w[..., :hm], pad, w[..., hm:], pad], axis=-1))
        return np.concatenate(out, axis=0)

    def to_hf(p):
        E = p.shape[0] // 2
        parts = []
        for m, hm in enumerate(h):
            mask = np.zeros(p.shape, bool)
            mask[m * E:(m + 1) * E, :, :hm] = mask[m * E:(m + 1) * E, :, H:H + hm] = True
            block = np.where(mask, 0, p)[m * E:(m + 1) * E]
            if np.any(block != 0):
                raise ValueError("layer: params['w1'] has non-zero entries in the zero padding "
                                 "of ernie4_5_vl_moe's narrower expert set; the HF block cannot "
                                 "hold them")
            w = p[m * E:(m + 1) * E]
            parts.append(np.concatenate([w[..., :hm], w[..., H:H + hm]], -1).transpose(0, 2, 1))
        return tuple(x.copy() for x in parts)
    return Tensor("w1", tuple(f"{m}experts.gate_up_proj" for m in sets), to_pymoe, to_hf)


def _modality_down(sets, h: tuple[int, int], H: int) -> Tensor:
    """down_proj [E, D, h_m] of each set -> w2 [2E, H, D], rows h_m..H-1 zero."""
    def to_pymoe(*arrays):
        out = []
        for a, hm in zip(arrays, h):
            w = a.transpose(0, 2, 1)  # [E, h, D]
            out.append(np.concatenate([w, np.zeros((w.shape[0], H - hm, w.shape[2]), w.dtype)],
                                      axis=1))
        return np.concatenate(out, axis=0)

    def to_hf(p):
        E = p.shape[0] // 2
        return tuple(_unpadded(p[m * E:(m + 1) * E], (slice(None), slice(0, hm)), "w2")
                     .transpose(0, 2, 1).copy() for m, hm in enumerate(h))
    return Tensor("w2", tuple(f"{m}experts.down_proj" for m in sets), to_pymoe, to_hf)


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
           note="text and vision experts: modality_sets=2, forward(x, token_types="
                "moe_mm_token_type_ids != 0); the narrower set zero-padded to the wider width"),
    Family("switch_transformers", ("SwitchTransformersSparseMLP",), "switch", "relu", _switch,
           note="the sparse MLP's output (not SwitchTransformersLayerFF's norm + residual); one "
                "sequence: HF's capacity counts per sequence"),
    Family("nllb-moe", ("NllbMoeSparseMLP",), "nllb-moe", "relu", _nllb,
           note="eval mode; compared against the correct experts (HF 5.24's NllbMoeExperts "
                "runs experts 0 and 1 only)"),
]
