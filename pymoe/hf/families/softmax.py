"""Softmax top-K families (the survey's convention C1): p = softmax(router logits) over E, the
top K of p, gates raw or renormalised over the K (the same as a softmax over the top-K logits)."""
from __future__ import annotations

import numpy as np

from ..layouts import Tensor, dbrx_flat, interleaved, linear, mlp_linear, same, stacked
from ._base import Config, Family, Spec, jitter_keywords, standard


def _mixtral(cfg: Config, layer, shapes) -> Spec:
    """MixtralSparseMoeBlock; in training mode router_jitter_noise jitters the block's input in
    place, so the experts see it too (jitter_experts)."""
    return standard(cfg, shapes, preset="mixtral",
                    **jitter_keywords(cfg.get("router_jitter_noise", 0.0)))


def _qwen2_moe(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="qwen2-moe", shared="shared_expert",
                    shared_gate="shared_expert_gate.weight",
                    normalize=bool(cfg.get("norm_topk_prob")))


def _qwen3_moe(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="qwen3-moe", normalize=bool(cfg.get("norm_topk_prob")))


def _olmoe(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="olmoe", normalize=bool(cfg.get("norm_topk_prob")))


def _renormalised_by_flag(preset_raw: str, preset_norm: str):
    """Softmax top-K with `norm_topk_prob` deciding raw or renormalised gates."""
    def spec(cfg: Config, layer, shapes) -> Spec:
        norm = bool(cfg.get("norm_topk_prob"))
        return standard(cfg, shapes, preset=preset_norm if norm else preset_raw, normalize=norm)
    return spec


def _always_renormalised(router: str = "gate.weight"):
    def spec(cfg: Config, layer, shapes) -> Spec:
        return standard(cfg, shapes, preset="qwen3-moe", router=router, normalize=True)
    return spec


def _never_renormalised(router: str = "gate.weight"):
    def spec(cfg: Config, layer, shapes) -> Spec:
        return standard(cfg, shapes, preset="olmoe", router=router, normalize=False)
    return spec


def _qwen3_next(cfg: Config, layer, shapes) -> Spec:
    """Qwen3-Next, Qwen3.5-MoE, Qwen4: the Qwen2-MoE block (sigmoid-gated shared expert) with
    renormalised gates (Qwen3.5-MoE's router always renormalises: no norm_topk_prob)."""
    return standard(cfg, shapes, preset="qwen3-next", shared="shared_expert",
                    shared_gate="shared_expert_gate.weight",
                    normalize=bool(cfg.get("norm_topk_prob", True)))


def _lara_mini(cfg: Config, layer, shapes) -> Spec:
    """LaraMini: Qwen3-MoE routing plus one ungated shared SwiGLU expert, added in full."""
    norm = bool(cfg.get("norm_topk_prob"))
    return standard(cfg, shapes, preset="qwen3-moe" if norm else "olmoe",
                    shared="shared_expert", normalize=norm)


def _aria(cfg: Config, layer, shapes) -> Spec:
    """Aria: top-K of the logits, softmax over the K (renormalised), computed in the model
    dtype; transposed experts `[E, D, 2H]` (always SiLU); shared experts one MLP of width
    moe_num_shared_experts * intermediate_size in hidden_act, with biases when mlp_bias."""
    if cfg.gated_form() != "swiglu":
        raise ValueError(f"config: aria's routed experts are SiLU-gated and its shared experts use "
                         f"hidden_act={cfg.get('hidden_act')!r}; pymoe's shared experts take the "
                         "routed experts' form")
    spec = standard(cfg, shapes, preset="mixtral", router="router.weight", transposed=True,
                    shared="shared_experts", k="moe_topk", form="swiglu")
    tensors = list(spec.tensors)
    if "shared_experts.gate_proj.bias" in shapes:
        tensors += [Tensor("shared_b1", ("shared_experts.gate_proj.bias", "shared_experts.up_proj.bias"),
                           lambda g, u: np.concatenate([g, u])[None].copy(),
                           lambda p: (p[0, :p.shape[1] // 2].copy(), p[0, p.shape[1] // 2:].copy())),
                    Tensor("shared_b2", ("shared_experts.down_proj.bias",), lambda a: a[None].copy(),
                           lambda p: (p[0].copy(),))]
    return Spec(spec.sizes, spec.keywords, tuple(tensors))


def _cohere2_moe(cfg: Config, layer, shapes) -> Spec:
    """Cohere2-MoE: top-K of the logits, then softmax over the K (= renormalised softmax) or a
    sigmoid of the K (optionally renormalised: pymoe's sigmoid score, no bias, no groups);
    optional shared experts (one MLP of width num_shared_experts * intermediate_size) summed
    or averaged with the routed output."""
    fn = cfg.get("expert_selection_fn", "softmax")
    if fn == "softmax":
        kw: dict = {"preset": "mixtral", "normalize": True}
    elif fn == "sigmoid":
        kw = {"preset": "deepseek-v3", "score": "sigmoid", "num_groups": None,
              "topk_groups": None, "group_score_k": None, "scaling_factor": None,
              "normalize": bool(cfg.get("norm_topk_prob"))}
    else:
        raise ValueError(f"config: cohere2_moe expert_selection_fn={fn!r}: HF takes 'softmax' "
                         "or 'sigmoid'")
    shared = "shared_experts" if "shared_experts.gate_proj.weight" in shapes else None
    if shared is not None:
        combine = cfg.get("shared_expert_combination_strategy", "average")
        if combine not in ("sum", "average"):
            raise ValueError(f"config: cohere2_moe shared_expert_combination_strategy={combine!r}: "
                             "HF takes 'sum' or 'average'")
        kw["shared_combine"] = "mean" if combine == "average" else "sum"
    return standard(cfg, shapes, shared=shared, **kw)


def _hunyuan_v1_moe(cfg: Config, layer, shapes) -> Spec:
    """HunYuan-MoE-V1: renormalised softmax top-K (router `gate.wg`, float32), an ungated
    shared SwiGLU MLP (`shared_mlp`) summed; moe_topk may be a per-layer list."""
    k = cfg.get("moe_topk")
    if isinstance(k, (list, tuple)):
        if layer is None:
            raise ValueError("layer: hunyuan_v1_moe's moe_topk is a per-layer list, so the layer "
                             "index is needed")
        k = k[layer]
    spec = standard(cfg, shapes, preset="mixtral", router="gate.wg.weight", shared="shared_mlp",
                    k="moe_topk")
    D, H, E, _ = spec.sizes
    return Spec((D, H, E, int(k)), spec.keywords, spec.tensors)


def _granite(cfg: Config, layer, shapes) -> Spec:
    """Granite MoE: top-K of the logits (cast to float32), softmax over the K; routed experts
    in `block_sparse_moe`. The decoder-layer variants (shared, SWA, hybrid) add the layer's
    shared MLP (`shared_mlp`, fused gate|up `input_linear` `[2Hs, D]`) to the MoE output: the
    MoE branch of the decoder layer is reproduced (its attention / Mamba and norms are left
    out)."""
    moe = "block_sparse_moe." if any(k.startswith("block_sparse_moe.") for k in shapes) else ""
    if moe == "" and any(k.startswith("shared_mlp.") for k in shapes):
        raise ValueError("block: this granite decoder layer has no experts (a dense layer)")
    spec = standard(cfg, shapes, preset="mixtral", router=f"{moe}router.weight",
                    experts=f"{moe}experts")
    if not moe:
        return spec
    tensors = list(spec.tensors)
    kw = dict(spec.keywords)
    used = {k for t in tensors for k in t.keys}
    if "shared_mlp.input_linear.weight" in shapes:
        tensors += [mlp_linear("shared_w1", "shared_mlp.input_linear.weight"),
                    mlp_linear("shared_w2", "shared_mlp.output_linear.weight")]
        used |= {"shared_mlp.input_linear.weight", "shared_mlp.output_linear.weight"}
        kw.update(num_shared_experts=1,
                  shared_d_hidden=shapes["shared_mlp.input_linear.weight"][0] // 2)
    ignored = tuple(k for k in shapes if k not in used)
    return Spec(spec.sizes, kw, tuple(tensors), ignored)


def _jetmoe(cfg: Config, layer, shapes) -> Spec:
    """JetMoE: top-K of the float32 logits, softmax over the K; experts `input_linear`
    `[E, 2H, D]`, `output_linear` `[E, D, H]`; one output bias `[D]` after the combine."""
    kw = {"preset": "mixtral", "capacity_factor": None,
          "activation": cfg.gated_form("activation_function"), "aux_loss_coef": 0.0,
          "z_loss_coef": 0.0, "num_shared_experts": 0, "shared_expert_gate": False,
          "output_bias": True}
    tensors = (linear("w_router", "router.layer.weight"), stacked("w1", "input_linear.weight"),
               stacked("w2", "output_linear.weight"), same("b_out", "bias"))
    E, H2, D = shapes["input_linear.weight"]
    return Spec((D, H2 // 2, E, int(cfg.get("num_experts_per_tok"))), kw, tensors)


def _gpt_oss_like(interleave: bool):
    """gpt-oss (interleaved gate/up columns) and the OpenAI privacy filter (concatenated; all in
    float32, gates / K and the output x K, which cancel): router logits with a learned bias,
    top-K of the logits, softmax over the K; experts `[E, D, 2H]` used as x @ W with biases;
    the clamped gpt-oss SwiGLU."""
    def spec(cfg: Config, layer, shapes) -> Spec:
        s = standard(cfg, shapes, preset="gpt-oss", router="router.weight", transposed=True,
                     form="swiglu_oai", swiglu_limit=float(cfg.get("swiglu_limit")),
                     swiglu_alpha=float(cfg.get("swiglu_alpha")))
        up = (lambda p, k: interleaved(p, k)) if interleave else (lambda p, k: same(p, k))
        tensors = [linear("w_router", "router.weight"), same("b_router", "router.bias"),
                   up("w1", "experts.gate_up_proj"), up("b1", "experts.gate_up_proj_bias"),
                   same("w2", "experts.down_proj"), same("b2", "experts.down_proj_bias")]
        return Spec(s.sizes, s.keywords, tuple(tensors))
    return spec


def _dbrx(cfg: Config, layer, shapes) -> Spec:
    """DBRX: softmax top-K in the logits dtype, gates divided by their L_p norm with
    p = moe_normalize_expert_weights (normalize_p; 1: renormalised; None: raw);
    experts flat w1, v1, w2 `[E*H, D]`. moe_jitter_eps (training only) is not reproduced."""
    ffn = dict(cfg.get("ffn_config"))
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p is not None and not float(p) > 0:
        raise ValueError(f"config: dbrx moe_normalize_expert_weights={p!r}: pymoe's L_p gate "
                         "norm (normalize_p) takes p > 0 or None")
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    form = Config({"hidden_act": act}, "dbrx").gated_form()
    E = int(ffn["moe_num_experts"])
    D = shapes["experts.mlp.w1"][1]
    H = shapes["experts.mlp.w1"][0] // E
    kw = {"preset": "mixtral" if p is not None else "olmoe", "normalize": p is not None,
          "normalize_p": 1.0 if p is None else float(p),
          **jitter_keywords(ffn.get("moe_jitter_eps")),
          "capacity_factor": None, "activation": form, "aux_loss_coef": 0.0,
          "z_loss_coef": 0.0, "num_shared_experts": 0, "shared_expert_gate": False}
    tensors = (linear("w_router", "router.layer.weight"),
               dbrx_flat("w1", ("experts.mlp.w1", "experts.mlp.v1"), E, transpose=True),
               dbrx_flat("w2", ("experts.mlp.w2",), E, transpose=False))
    return Spec((D, H, E, int(ffn["moe_top_k"])), kw, tensors)


# save_pretrained's names for Granite's MoE block (transformers' conversion_mapping renames them)
_GRANITE_DISK = {"input_linear.weight": "experts.gate_up_proj",
                 "output_linear.weight": "experts.down_proj",
                 "router.layer.weight": "router.weight"}
_GRANITE_LAYER_DISK = {f"block_sparse_moe.{k}": f"block_sparse_moe.{v}"
                       for k, v in _GRANITE_DISK.items()}

FAMILIES = [
    Family("mixtral", ("MixtralSparseMoeBlock",), "mixtral", "swiglu", _mixtral,
           disk_blocks=("block_sparse_moe", "mlp")),
    Family("qwen2_moe", ("Qwen2MoeSparseMoeBlock",), "qwen2-moe", "swiglu", _qwen2_moe),
    Family("qwen3_moe", ("Qwen3MoeSparseMoeBlock",), "qwen3-moe", "swiglu", _qwen3_moe),
    Family("olmoe", ("OlmoeSparseMoeBlock",), "olmoe", "swiglu", _olmoe),
    Family("flex_olmo", ("FlexOlmoSparseMoeBlock",), "olmoe", "swiglu",
           _renormalised_by_flag("olmoe", "qwen3-moe"),
           note="qwen3-moe preset when norm_topk_prob (default False: olmoe)"),
    Family("mellum", ("MellumSparseMoeBlock",), "qwen3-moe", "swiglu",
           _renormalised_by_flag("olmoe", "qwen3-moe")),
    Family("minimax", ("MiniMaxSparseMoeBlock",), "mixtral", "swiglu",
           _mixtral, note="the Mixtral block",
           disk_blocks=("block_sparse_moe", "mlp")),
    Family("jamba", ("JambaSparseMoeBlock",), "olmoe", "swiglu", _never_renormalised("router.weight"),
           note="gates never renormalised", disk_blocks=("feed_forward",)),
    Family("qwen3_vl_moe", ("Qwen3VLMoeTextSparseMoeBlock",), "qwen3-moe", "swiglu",
           _always_renormalised(), note="the text model's blocks; gates always renormalised"),
    Family("qwen3_omni_moe", ("Qwen3OmniMoeThinkerTextSparseMoeBlock",), "qwen3-moe", "swiglu",
           _renormalised_by_flag("olmoe", "qwen3-moe"),
           note="the thinker's text blocks (the talker's are not covered)"),
    Family("qwen3_next", ("Qwen3NextSparseMoeBlock",), "qwen3-next", "swiglu", _qwen3_next),
    Family("qwen3_5_moe", ("Qwen3_5MoeSparseMoeBlock",), "qwen3-next", "swiglu", _qwen3_next,
           note="the text model's blocks; gates always renormalised"),
    Family("qwen4_exp", ("Qwen4ExpTextSparseMoeBlock",), "qwen3-next", "swiglu", _qwen3_next,
           note="the text model's blocks"),
    Family("lara_mini", ("LaraMiniSparseMoeBlock",), "qwen3-moe", "swiglu", _lara_mini,
           note="ungated shared expert, summed"),
    Family("aria", ("AriaTextMoELayer",), "mixtral", "swiglu", _aria, router_dtype="model",
           note="the text model's blocks; transposed experts; router in the model dtype",
           disk_renames={"experts.fc1.weight": "experts.gate_up_proj",
                         "experts.fc2.weight": "experts.down_proj"}),
    Family("cohere2_moe", ("Cohere2MoeSparseMoeBlock",), "mixtral", "swiglu", _cohere2_moe,
           note="expert_selection_fn 'sigmoid': deepseek-v3 without groups, bias or scaling; "
           "shared experts summed or averaged"),
    Family("hunyuan_v1_moe", ("HunYuanMoEV1Moe",), "mixtral", "swiglu", _hunyuan_v1_moe,
           note="ungated shared MLP, summed"),
    Family("granitemoe", ("GraniteMoeMoE",), "mixtral", "swiglu", _granite,
           disk_blocks=("block_sparse_moe",), disk_renames=_GRANITE_DISK),
    Family("granitemoeshared", ("GraniteMoeSharedDecoderLayer",), "mixtral", "swiglu", _granite,
           note="the decoder layer's MoE branch: block_sparse_moe + shared_mlp",
           disk_blocks=("block_sparse_moe", "shared_mlp"),
           disk_renames=_GRANITE_LAYER_DISK, disk_layer=True),
    Family("granitemoe_swa", ("GraniteMoeSWADecoderLayer",), "mixtral", "swiglu", _granite,
           note="the decoder layer's MoE branch: block_sparse_moe + shared_mlp",
           disk_blocks=("block_sparse_moe", "shared_mlp"),
           disk_renames=_GRANITE_LAYER_DISK, disk_layer=True),
    Family("granitemoehybrid", ("GraniteMoeHybridDecoderLayer",), "mixtral", "swiglu", _granite,
           note="the decoder layer's MoE branch: block_sparse_moe + shared_mlp",
           disk_blocks=("block_sparse_moe", "shared_mlp"),
           disk_renames=_GRANITE_LAYER_DISK, disk_layer=True),
    Family("jetmoe", ("JetMoeMoE",), "mixtral", "swiglu", _jetmoe,
           note="output bias; the attention experts (JetMoeMoA) are not covered"),
    Family("gpt_oss", ("GptOssMLP",), "gpt-oss", "swiglu_oai", _gpt_oss_like(True),
           router_dtype="model", note="interleaved gate/up, expert and router biases"),
    Family("openai_privacy_filter", ("OpenAIPrivacyFilterMLP",), "gpt-oss", "swiglu_oai",
           _gpt_oss_like(False), note="HF computes the whole block in float32"),
    Family("dbrx", ("DbrxFFN",), "mixtral", "swiglu", _dbrx, router_dtype="model",
           note="moe_normalize_expert_weights p -> normalize_p (None: raw gates); moe_jitter_eps "
           "-> jitter_eps + jitter_experts", disk_blocks=("ffn",)),
]
