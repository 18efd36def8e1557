"""Families whose routing or experts need the mechanisms of the HF-MoE issue's second half:
zero-computation experts (LongCat-Flash), joint normalisation of routed and router-scored shared
experts (Inkling), the latent MoE with a logit multiplier (MuseSpark), the MLP router with a
cross-layer state and a skip expert (Zaya).

LongCat-Flash (C4, X1 + X10): p = softmax over the E real and Z zero experts' logits (float32,
the classifier's bias never used), the top K of p + b (b: e_score_correction_bias, selection
only), gate = p * routed_scaling_factor, not renormalised; experts E .. E+Z-1 are identities
(pymoe's identity_experts). HF allocates gate_up_proj for E + Z experts but down_proj for E, and
the Z extra gate_up_proj rows are never read: pymoe has no parameters for them, so its state
dict writes them as 0 (and their gradient is 0, as torch's).

Inkling (C6, X1 + router-scored shared experts): gate.weight scores the E routed and S shared
experts (`[E + S, D]`, shared last), s = sigmoid, the top K of s + b over the routed ones, the K
chosen and S shared scores normalised together, times route_scale and the learned
gate.global_scale (pymoe's shared_router_scored); the S shared SwiGLU experts are stacked
`[S, H, D]` and each weighed by its normalised score. The router runs in float32.

MuseSpark (C2 on multiplied logits, X1 in a latent space): logits = (x W) * output_multiplier,
s = sigmoid, the top K of s + b, gates renormalised (by sum + 1e-15: 1e-15 relative, invisible)
times routed_scaling_factor; the experts run on rms(x @ pre_expert_proj) * (1 + w) (a centred
RMSNorm) in moe_hidden_size, each expert's output is normalised by rms(o * (1 + w')) (one w'
for all experts) before its gate weighs it, and post_expert_proj maps the sum back. pymoe:
logit_multiplier, latent_dim, latent_norm, expert_post_norm. HF computes both norms and the
router in float32 even in a float64 block, so float64 agrees to float32 round-off.

Zaya (C4, X1 + X11): an MLP router (pymoe's router_mlp; layers after the first add the previous
layer's router state times gate.router_states_scale: router_state_input), p = softmax over the E
real experts and one skip expert (the last), the top K (= 1) of p + balancing_biases, gate = p.
HF rewrites a choice of the skip expert to expert 0 with gate 0, so expert 0 runs on it for
nothing and counts it as load; pymoe keeps the choice as the null expert E (null_experts=1):
the same output and gradients, the skip counted where it was chosen. The router's RMSNorm runs
in float32 even in a float64 block.
"""
from __future__ import annotations

import numpy as np

from ..layouts import Tensor, flat, linear, same, stacked
from ._base import Config, Family, Spec


def _first_rows(param: str, key: str, real: int, extra: int) -> Tensor:
    """gate_up_proj `[E + Z, 2H, D]` of which the first E rows are used <-> pymoe w1 `[E, D, 2H]`;
    the Z unused rows come back as zeros (they hold nothing pymoe computes with)."""
    def to_hf(p: np.ndarray) -> tuple[np.ndarray, ...]:
        t = p.transpose(0, 2, 1)
        return (np.concatenate([t, np.zeros((extra,) + t.shape[1:], t.dtype)]),)
    return Tensor(param, (key,), lambda a: a[:real].transpose(0, 2, 1).copy(), to_hf)


def _longcat_flash(cfg: Config, layer, shapes) -> Spec:
    total = shapes["router.classifier.weight"][0]  # E + Z
    E = shapes["experts.down_proj"][0]
    Z = total - E
    if Z != int(cfg.get("zero_expert_num") or 0):
        raise ValueError(f"config: longcat_flash zero_expert_num={cfg.get('zero_expert_num')} "
                         f"but the router scores {total} experts for {E} real ones")
    D, H = shapes["experts.down_proj"][1], shapes["experts.down_proj"][2]
    tensors = (linear("w_router", "router.classifier.weight"),
               _first_rows("w1", "experts.gate_up_proj", E, Z),
               stacked("w2", "experts.down_proj"),
               flat("expert_bias", "router.e_score_correction_bias", buffer=True))
    kw = dict(preset="olmoe", capacity_factor=None, activation=cfg.gated_form(),
              aux_loss_coef=0.0, z_loss_coef=0.0, normalize=False,
              scaling_factor=float(cfg.get("routed_scaling_factor")), identity_experts=Z)
    ignored = tuple(k for k in ("router.classifier.bias",) if k in shapes)  # never read by HF
    return Spec((D, H, total, int(cfg.get("moe_topk"))), kw, tensors, ignored)


def _stacked_gate_up(param: str, gate: str, up: str) -> Tensor:
    """gate_proj and up_proj `[S, H, D]` each <-> shared_w1 `[S, D, 2H]` (gate columns first)."""
    def to_hf(p: np.ndarray) -> tuple[np.ndarray, ...]:
        h = p.shape[2] // 2
        return p[:, :, :h].transpose(0, 2, 1).copy(), p[:, :, h:].transpose(0, 2, 1).copy()
    return Tensor(param, (gate, up),
                  lambda g, u: np.concatenate([g, u], axis=1).transpose(0, 2, 1).copy(), to_hf)


def _inkling(cfg: Config, layer, shapes) -> Spec:
    E, H2, D = shapes["experts.gate_up_proj"]
    S = shapes["shared_experts.gate_proj"][0]
    if shapes["gate.weight"][0] != E + S:
        raise ValueError(f"block: inkling gate.weight scores {shapes['gate.weight'][0]} experts, "
                         f"expected E + S = {E} + {S}")
    tensors = (linear("w_router", "gate.weight"), same("global_scale", "gate.global_scale"),
               flat("expert_bias", "gate.e_score_correction_bias", buffer=True),
               stacked("w1", "experts.gate_up_proj"), stacked("w2", "experts.down_proj"),
               _stacked_gate_up("shared_w1", "shared_experts.gate_proj", "shared_experts.up_proj"),
               stacked("shared_w2", "shared_experts.down_proj"))
    kw = dict(preset="inkling", capacity_factor=None, activation=cfg.gated_form(),
              aux_loss_coef=0.0, z_loss_coef=0.0, num_shared_experts=S,
              shared_d_hidden=shapes["shared_experts.gate_proj"][1],
              scaling_factor=float(cfg.get("route_scale")))
    return Spec((D, H2 // 2, E, int(cfg.get("num_experts_per_tok"))), kw, tensors)


def _muse_spark(cfg: Config, layer, shapes) -> Spec:
    E, H2, Dm = shapes["experts.gate_up_proj"]
    D = shapes["pre_expert_proj.weight"][1]
    tensors = (linear("w_router", "gate.weight"),
               flat("expert_bias", "gate.e_score_correction_bias", buffer=True),
               linear("w_latent_in", "pre_expert_proj.weight"),
               same("latent_norm_weight", "pre_expert_norm.weight"),
               stacked("w1", "experts.gate_up_proj"), stacked("w2", "experts.down_proj"),
               same("expert_post_norm_weight", "experts.post_expert_norm.weight"),
               linear("w_latent_out", "post_expert_proj.weight"))
    kw = dict(preset="glm4-moe", capacity_factor=None, activation=cfg.gated_form(),
              aux_loss_coef=0.0, z_loss_coef=0.0, num_shared_experts=0, normalize=True,
              scaling_factor=float(cfg.get("routed_scaling_factor")),
              logit_multiplier=float(cfg.get("output_multiplier")), latent_dim=Dm,
              latent_norm=True, latent_norm_eps=float(cfg.get("rms_norm_eps")),
              expert_post_norm=True, expert_post_norm_eps=float(cfg.get("post_norm_eps")))
    return Spec((D, H2 // 2, E, int(cfg.get("num_experts_per_tok"))), kw, tensors)


def _zaya(cfg: Config, layer, shapes) -> Spec:
    E, H2, D = shapes["experts.gate_up_proj"]
    R = shapes["gate.down_proj.weight"][0]
    g = "gate.router_mlp."
    tensors = [linear("w_router_down", "gate.down_proj.weight"),
               same("b_router_down", "gate.down_proj.bias"),
               same("router_norm_weight", g + "norm.weight"),
               linear("w_router_fc1", g + "fc1.weight"), same("b_router_fc1", g + "fc1.bias"),
               linear("w_router_fc2", g + "fc2.weight"), same("b_router_fc2", g + "fc2.bias"),
               linear("w_router", g + "out_proj.weight"),
               flat("expert_bias", "gate.balancing_biases", buffer=True),
               stacked("w1", "experts.gate_up_proj"), stacked("w2", "experts.down_proj")]
    state = "gate.router_states_scale" in shapes  # every layer but the first
    if state:
        tensors.append(same("router_state_scale", "gate.router_states_scale"))
    kw = dict(preset="olmoe", capacity_factor=None, activation=cfg.gated_form(),
              aux_loss_coef=0.0, z_loss_coef=0.0, normalize=False, null_experts=1,
              router_mlp=R, router_mlp_eps=float(cfg.get("rms_norm_eps")),
              router_state_input=state)
    return Spec((D, H2 // 2, E + 1, int(cfg.get("num_experts_per_tok"))), kw, tuple(tensors))


FAMILIES = [
    Family("longcat_flash", ("LongcatFlashMoE",), "olmoe", "swiglu", _longcat_flash,
           note="the shortcut MoE's output; Z identity experts after the E real ones "
                "(identity_experts); the classifier bias is never read by HF"),
    Family("inkling", ("InklingMoE",), "inkling", "swiglu", _inkling,
           note="router-scored shared experts normalised with the K routed ones "
                "(shared_router_scored)"),
    Family("muse_spark", ("MuseSparkMoE",), "glm4-moe", "swiglu", _muse_spark,
           note="latent MoE (latent_dim, latent_norm, expert_post_norm) on logits times "
                "output_multiplier (logit_multiplier); HF's norms run in float32"),
    Family("zaya", ("ZayaSparseMoeBlock",), "olmoe", "swiglu", _zaya,
           note="MLP router with the cross-layer router state (router_mlp, forward(x, "
                "router_state=)); the skip expert is null expert E (HF: expert 0, gate 0)"),
]
