"""The routing conventions one family each uses: DeepSeek-V4 (C2 with sqrt-softplus scores, and
C9 hash routing), PhiMoE's SparseMixer (C7) and Doge's product keys (C8).

DeepSeek-V4 (deepseek_v4): s = ACT2FN[scoring_func](logits) (default sqrt(softplus)); an
ordinary ("moe") layer takes the top K of s + b (gate.e_score_correction_bias, no groups), a
hash ("hash_moe") layer the K experts gate.tid2eid[input_ids] (pymoe: hash_table, forward(x,
token_ids=...)); either way gate = s renormalised over the K chosen (+1e-20, never read
norm_topk_prob) times routed_scaling_factor. Experts and the one shared MLP (width
intermediate_size; n_shared_experts is never read) are clamped SwiGLUs, limit swiglu_limit.

PhiMoE (phimoe): selection="sparsemixer" (pymoe.variants.sparsemixer), eps router_jitter_noise.

Doge (doge): product_keys="doge" (pymoe.variants.product_keys), single-neuron experts.
"""
from __future__ import annotations

from ..layouts import embed_rows, linear, mlp_gate_up, mlp_linear, same
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


def _doge(cfg: Config, layer, shapes) -> Spec:
    """DogeCDMoE: router_gate [2n, D] (n = floor(sqrt(E))), single-neuron experts down_embed /
    up_embed [E, D] (h = act(x . d_e), H = 1), the dense MLP gate/up/down_proj always added."""
    if not cfg.get("is_moe"):
        raise ValueError("config: doge with is_moe=False has no MoE block (DogeMLP)")
    if cfg.get("hidden_act") not in ("silu", "swish"):
        raise ValueError(f"config: doge hidden_act={cfg.get('hidden_act')!r}: pymoe's doge "
                         "experts are silu (and the MLP SwiGLU)")
    E, D = shapes["down_embed.weight"]
    n = shapes["router_gate.weight"][0] // 2
    if n * n != E:
        raise ValueError(f"config: doge num_experts={E} is not a square: HF's floor(sqrt(E)) = "
                         f"{n} keys per half reach only {n * n} experts")
    Hs = shapes["gate_proj.weight"][0]
    tensors = (linear("w_router", "router_gate.weight"),
               embed_rows("w1", "down_embed.weight", into=True),
               embed_rows("w2", "up_embed.weight", into=False),
               mlp_gate_up("shared_w1", "gate_proj.weight", "up_proj.weight"),
               mlp_linear("shared_w2", "down_proj.weight"))
    kw = {"preset": "doge", "capacity_factor": None, "aux_loss_coef": 0.0, "z_loss_coef": 0.0,
          "shared_d_hidden": Hs}
    return Spec((D, 1, E, int(cfg.get("num_experts_per_tok"))), kw, tensors)


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
    Family("doge", ("DogeCDMoE",), "doge", "silu", _doge,
           note="product keys with HF's view(2, T, n), which mixes tokens (not causal); "
           "single-neuron silu experts (H = 1) + the dense SwiGLU MLP; returns (y, router "
           "logits), y compared", router_dtype="model"),
)
