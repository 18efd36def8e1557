"""Softmax top-K families (the survey's convention C1): p = softmax(router logits) over E, the
top K of p, gates raw or renormalised over the K (the same as a softmax over the top-K logits)."""
from __future__ import annotations

from ._base import Config, Family, Spec, standard


def _mixtral(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="mixtral")


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
           _always_renormalised(), note="the Mixtral block",
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
]
