"""The routing conventions one family each uses: DeepSeek-V4 (C2 with sqrt-softplus scores, and
C9 hash routing), PhiMoE's SparseMixer (C7) and Doge's product keys (C8).

DeepSeek-V4 (deepseek_v4): s = ACT2FN[scoring_func](logits) (default sqrt(softplus)); an
ordinary ("moe") layer takes the top K of s + b (gate.e_score_correction_bias, no groups), a
hash ("hash_moe") layer the K experts gate.tid2eid[input_ids] (pymoe: hash_table, forward(x,
token_ids=...)); either way gate = s renormalised over the K chosen (+1e-20, never read
norm_topk_prob) times routed_scaling_factor. Experts and the one shared MLP (width
intermediate_size; n_shared_experts is never read) are clamped SwiGLUs, limit swiglu_limit.

PhiMoE (phimoe): selection="sparsemixer" (pymoe.variants.sparsemixer), eps router_jitter_noise.
"""
from __future__ import annotations

from ..layouts import same
from ._base import Config, Family, Spec, standard

# DeepSeek-V4's scoring_func (HF ACT2FN name) -> pymoe's score
_DSV4_SCORES = {"sqrtsoftplus": "sqrtsoftplus", "sigmoid": "sigmoid", "softmax": "softmax"}


def _deepseek_v4(cfg: Config, layer, shapes) -> Spec:
    fn = cfg.get("scoring_func")
    if fn not in _DSV4_SCORES:
        raise ValueError(f"config: deepseek_v4 scoring_func={fn!r}: pymoe scores by "
                         f"{', '.join(map(repr, _DSV4_SCORES))}")
    if cfg.get("hidden_act") not in ("silu", "swish"):
        raise ValueError(f"config: deepseek_v4 hidden_act={cfg.get('hidden_act')!r}: its "
                         "clamped experts are SwiGLUs (silu)")
    hashed = "gate.tid2eid" in shapes  # the block's router is DeepseekV4HashRouter
    spec = standard(cfg, shapes, preset="deepseek-v4", shared="shared_experts",
                    bias=None if hashed else "gate.e_score_correction_bias",
                    form="swiglu_clamped", swiglu_limit=float(cfg.get("swiglu_limit")),
                    score=_DSV4_SCORES[fn], normalize=True,
                    scaling_factor=float(cfg.get("routed_scaling_factor")))
    if not hashed:
        return spec
    return Spec(spec.sizes, spec.keywords, spec.tensors + (same("hash_table", "gate.tid2eid",
                                                                 buffer=True),))


def _phimoe(cfg: Config, layer, shapes) -> Spec:
    """PhiMoE: nn.Linear router `router.weight` (no bias), fused SwiGLU experts; K = 2 whatever
    num_experts_per_tok says (sparsemixer never reads its top_k)."""
    spec = standard(cfg, shapes, preset="phimoe", router="router.weight",
                    sparsemixer_eps=float(cfg.get("router_jitter_noise")))
    D, H, E, _ = spec.sizes
    return Spec((D, H, E, 2), spec.keywords, spec.tensors)


FAMILIES = (
    Family("deepseek_v4", ("DeepseekV4SparseMoeBlock",), "deepseek-v4", "swiglu_clamped",
           _deepseek_v4, note="hash layers (mlp_layer_types 'hash_moe'): hash_table = "
           "gate.tid2eid, forward(x, token_ids=input_ids); the other layers: top-K of "
           "sqrt(softplus) + bias", router_dtype="model"),
    Family("phimoe", ("PhimoeSparseMoeBlock",), "phimoe", "swiglu", _phimoe,
           note="eval: SparseMixer's argmax picks; training (forward(x, train=True)): Gumbel "
           "picks and the Heun-3 estimator (HF's own draws: tests/hf/test_singles.py); K = 2 "
           "always (num_experts_per_tok never read); input jitter not reproduced",
           router_dtype="model"),
)
