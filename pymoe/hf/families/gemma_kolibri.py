"""Families issue 23 made loadable with new layer and routing keywords: kolibri1 (the selection
bias added to the logits, expert_bias_on="logits") and Gemma 4's MoE branch (gemma4,
diffusion_gemma: the survey's convention C5).

Gemma 4 runs its MoE beside a dense MLP inside the decoder layer. pymoe's layer is the MoE
branch of that layer, given the branch's input x (the residual stream after attention):

    y = post_feedforward_layernorm_2( sum_j g_j * scale[e_j] * FFN_e(pre_feedforward_layernorm_2(x)) )

with the router reading RMSNorm(x) * router.scale * D^-1/2 (router_input_norm), softmax top-K
renormalised, times per_expert_scale (gate_scale), the experts reading their own norm of x
(expert_input_norm) and the output norm as post_norm. The dense MLP, its norms
(pre_feedforward_layernorm, post_feedforward_layernorm_1), the sum of the two branches, the
post_feedforward_layernorm after it and the residual are the decoder layer's, not the MoE's.
"""
from __future__ import annotations

from ..layouts import same
from ._base import Config, Family, Spec, standard


def _kolibri1(cfg: Config, layer, shapes) -> Spec:
    """Kolibri1TopKRouter: top-K of logits + e_score_correction_bias, gate sigmoid(chosen
    logit), optionally renormalised, no scaling; one ungated shared MLP."""
    return standard(cfg, shapes, preset="glm4-moe", shared="shared_experts",
                    bias="gate.e_score_correction_bias", expert_bias_on="logits",
                    normalize=bool(cfg.get("norm_topk_prob")), scaling_factor=None,
                    num_groups=None, topk_groups=None, group_score_k=None)


_GEMMA_BRANCH = {"router_norm_scale": "router.scale", "gate_scale": "router.per_expert_scale",
                 "expert_norm_weight": "pre_feedforward_layernorm_2.weight",
                 "post_norm_weight": "post_feedforward_layernorm_2.weight"}


def _gemma4(cfg: Config, layer, shapes) -> Spec:
    """The decoder layer's MoE branch (module docstring); a layer without experts (Gemma 4 with
    enable_moe_block False) is refused."""
    if "router.proj.weight" not in shapes:
        raise ValueError(f"block: this {cfg.family} decoder layer has no MoE branch "
                         "(enable_moe_block is False: a dense layer)")
    eps = float(cfg.get("rms_norm_eps"))
    spec = standard(cfg, shapes, preset="gemma4", router="router.proj.weight",
                    k="top_k_experts", form=cfg.gated_form("hidden_activation"),
                    normalize=True, post_norm_eps=eps, input_norm_eps=eps)
    tensors = spec.tensors + tuple(same(p, k) for p, k in _GEMMA_BRANCH.items())
    used = {k for t in tensors for k in t.keys}
    return Spec(spec.sizes, spec.keywords, tensors, tuple(k for k in shapes if k not in used))


_GEMMA_DISK = ("router", "experts", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")

FAMILIES = [
    Family("kolibri1", ("Kolibri1SparseMoeBlock",), "glm4-moe", "swiglu", _kolibri1,
           note="selection bias on the logits (expert_bias_on='logits'), gate sigmoid(logit)"),
    Family("gemma4", ("Gemma4TextDecoderLayer",), "gemma4", "geglu", _gemma4,
           note="the decoder layer's MoE branch: router_input_norm, expert_input_norm, "
           "gate_scale, post_norm (pymoe.hf.families.gemma_kolibri); the dense MLP beside it "
           "is the layer's", disk_blocks=_GEMMA_DISK, disk_layer=True),
    Family("diffusion_gemma", ("DiffusionGemmaEncoderTextLayer",
                               "DiffusionGemmaDecoderTextLayer"), "gemma4", "geglu", _gemma4,
           note="as gemma4", disk_blocks=_GEMMA_DISK, disk_layer=True),
]
