"""Every keyword of route() and MoELayer, written once: its name, default, check and doc.

RouteOptions holds the routing keywords (each one a variant of one routing step; docs/variants.md
says which system uses which), ExpertOptions MoELayer's own (experts, losses,
noise, formulation, token groups). route(), MoELayer, the presets and compare() take these
keywords as **keywords and pass them here, so adding a variant is one field below plus its step.
The defaults are the original pymoe routing: leaving a keyword out changes nothing.
"""
from __future__ import annotations

import dataclasses
import numbers
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _checks
from .capacity import capacity_args
from .expert_forms import EXPERT_FORMS
from .losses import LOAD_BALANCING
from .router import ROUTER_DTYPES
from .slots import DROP_POLICIES
from .topk import SECOND_EXPERT_POLICIES
from .variants.product_keys import PRODUCT_KEY_LAYOUTS as PRODUCT_KEYS
from .variants.scores import SCORES
from .variants.sinkhorn import SINKHORN_ITERATIONS

PRIORITIES = ("choice", "score", "token", "random")
SELECTIONS = ("tokens", "experts", "sinkhorn", "relu", "sparsemixer")
ROUTER_NOISE = ("none", "jitter", "noisy_topk")
FORMULATIONS = ("indexed", "dense")
SHARED_COMBINES = ("sum", "mean")
LOAD_STATS = ("local", "global")
PADDINGS = ("absent", "routed", "counted")
BIAS_ON = ("scores", "logits")

Check = Callable[[str, Any], Any]  # (keyword, value) -> the checked value, or raises naming it


def _choice(choices: tuple[str, ...]) -> Check:
    return lambda name, v: _checks.choice(name, v, choices)


def _positive(allow_none: bool = False) -> Check:
    return lambda name, v: _checks.positive_finite(name, v, allow_none=allow_none)


def _positive_or_zero(name: str, v: Any) -> float | None:
    """None, or a finite float > 0; 0 is kept (step3p7 writes 0 for no limit; the form checks)."""
    if v is not None and not isinstance(v, (bool, np.bool_)) and isinstance(v, numbers.Real) \
            and float(v) == 0.0:
        return 0.0
    return _checks.positive_finite(name, v, allow_none=True)


def _caps(name: str, v: Any) -> tuple[float, float] | None:
    """None or a pair of finite floats > 0."""
    if v is None:
        return None
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise TypeError(f"{name}: expected a pair (gate cap, up cap) or None, got {v!r}")
    return (float(_checks.positive_finite(f"{name}[0]", v[0]) or 0),
            float(_checks.positive_finite(f"{name}[1]", v[1]) or 0))


def _unit_interval(name: str, v: Any) -> float:
    """A finite float in (0, 1]."""
    p = float(_checks.positive_finite(name, v) or 0)
    if p > 1.0:
        raise ValueError(f"{name}: expected a probability mass in (0, 1], got {p}")
    return p


def _integer(low: int) -> Check:
    return lambda name, v: _checks.integer(name, v, low=low)


def keyword(default: Any, doc: str, check: Check | None = None,
            cli: tuple[type, str] | None = None, device: bool = False) -> Any:
    """A field of RouteOptions / ExpertOptions: its default, its doc and its check (None: checked
    with the others it depends on, in route_options / expert_options); cli: (type, help) of its
    command-line flag, for the keywords python -m pymoe.compare shares across presets; device:
    whether the CUDA backend's device route (CudaBackend.route) runs that variant."""
    return field(default=default, metadata={"doc": doc, "check": check, "cli": cli,
                                            "device": device})


@dataclass(frozen=True)
class RouteOptions:
    """Everything route() needs besides the logits, the expert bias and the random generator."""
    k: int = keyword(1, "K choices per token, 1 <= K <= E.")
    capacity_factor: float | None = keyword(
        1.25, "> 0 and finite, or None for dropless routing (capacity.expert_capacity).")
    min_capacity: int = keyword(0, "lower bound on C (>= 0).", cli=(
        int, "shared lower bound on C (default: each preset's own)"), device=True)
    normalize: bool = keyword(False, "divide the K chosen scores by their sum (topk.gates).",
                              _checks.boolean, device=True)
    priority: str = keyword(
        "choice", '"choice" (choice-major, token order), "score" (batch-prioritised), "token" '
        '(token-major), "random" (random token order, needs seed) (priority.priority_order).',
        _choice(PRIORITIES), device=True)
    score: str = keyword('softmax', '"softmax", "sigmoid" (variants.scores.sigmoid) or '
                         '"sqrtsoftplus" (sqrt(softplus(l)), DeepSeek-V4; '
                         'variants.scores.sqrt_softplus).', _choice(SCORES))
    num_groups: int | None = keyword(
        None, "G expert groups for group-limited top-K (variants.group_limited.limit_to_groups).")
    topk_groups: int | None = keyword(None, "how many groups each token may use (with num_groups).")
    group_score_k: int | None = keyword(
        None, "experts summed per group score; None means max(1, k // topk_groups).")
    scaling_factor: float | None = keyword(None, "multiplies the final gates (topk.scale_gates).",
                                           _positive(allow_none=True))
    drop_policy: str = keyword(
        "position", '"position" (first C in priority order) or "probs" (C best gates per expert; '
        'capacity.keep_by_score).', _choice(DROP_POLICIES), device=True)
    renormalize_after_drop: bool = keyword(
        False, "renormalise the surviving gates after drops (topk.renormalize_kept).",
        _checks.boolean)
    selection: str = keyword(
        "tokens", '"tokens" (top-K per token), "experts" (expert choice: each expert takes its '
        'top-C tokens, K = E pairs; variants.expert_choice), "sinkhorn" (top-K of the Sinkhorn-'
        'balanced scores, variants.sinkhorn; sinkhorn_iterations rounds), "relu" (ReMoE: gates '
        "relu(logits), each token takes its experts with a positive logit, K = E pairs listed "
        "and the positive ones in Routing.selected; k is the target K; aux_loss is the L1 "
        "regulariser, whose coefficient variants.relu_routing.update_l1_coef adapts), "
        '"sparsemixer" (PhiMoE: K sequential picks among the experts within a relative '
        "threshold of the best, gate the pick's masked softmax; variants.sparsemixer).",
        _choice(SELECTIONS))
    capacity_rule: str = keyword("k_ceil", "the capacity formula (capacity.expert_capacity).")
    capacity: int | None = keyword(None, "a fixed C instead of any formula.")
    load_balancing: str = keyword("switch", "which load-balancing loss (losses.balance_loss).",
                                  _choice(LOAD_BALANCING))
    sequence_length: int | None = keyword(
        None, 'tokens per sequence, for load_balancing="sequence" (T a multiple of it).')
    second_expert_policy: str = keyword(
        "all", "GShard's top-2 second-expert policy (topk.second_expert_keep; k = 2).",
        _choice(SECOND_EXPERT_POLICIES))
    second_expert_threshold: float = keyword(0.2, "its threshold.", _positive())
    sinkhorn_iterations: int = keyword(SINKHORN_ITERATIONS, "Sinkhorn rounds (>= 1).",
                                       _integer(1))
    sparsemixer_eps: float = keyword(
        0.01, "SparseMixer's eps (HF PhiMoE router_jitter_noise, >= 0): pick j's candidates lie "
        "within (m - l) / max(|l|, m) <= 2 eps of the best remaining logit m; with "
        'selection="sparsemixer" only.', _checks.nonnegative_finite)
    sparsemixer_sampling: bool = keyword(
        False, "SparseMixer in training: Gumbel-max picks and the Heun third-order gate factor "
        "(variants.sparsemixer; needs seed). MoELayer turns it on in forward(x, train=True) "
        'itself. With selection="sparsemixer" only.', _checks.boolean)
    router_dtype: str | None = keyword(
        None, 'the dtype of the router logits: "bfloat16" or "float16" round them to that format '
        '(precision.round_to, what a 16-bit router computes) and the scores are computed in '
        'float32 from the rounded logits, as HF models do; "float32" or "float64" cast them; None '
        "keeps their dtype, promoted to at least float32. d logits pass the rounding unchanged "
        "(a cast's gradient) (pymoe.precision).",
        lambda n, v: None if v is None else _checks.choice(n, v, ROUTER_DTYPES))
    padding: str = keyword(
        "absent", 'what route(..., token_mask=m) does with the padding rows (m False); every '
        'statistic (aux loss, z-loss, expert_load, drop metrics) leaves them out whatever this '
        'says: "absent" (pymoe: no slot, gate 0, capacity from the real tokens; the real rows '
        'equal route(L[m])), "routed" (Megatron-Core: padding is routed and takes slots), '
        '"counted" (HF NLLB-MoE: padding is not routed but counts in T for the capacity) '
        '(docs/variants.md, "Padding").', _choice(PADDINGS))
    top_p: float | None = keyword(
        None, "top-p (dynamic-K) routing, arXiv 2403.07652: 0 < p <= 1; each token takes its "
        "ranked experts until their softmax mass passes p (the crossing expert included), at "
        "most k of them (k = E: no cap, as the paper); the rest are unselected "
        "(Routing.selected), take no slot and count in no load (variants.top_p). None: top-K.",
        lambda n, v: None if v is None else _unit_interval(n, v))

    # issue 23, the smaller switches (kolibri1, axk2, dbrx, lfm2_moe; docs/variants.md)
    expert_bias_on: str = keyword(
        "scores", 'what expert_bias is added to for choosing: "scores" (DeepSeek-V3: rank s + b) '
        'or "logits" (kolibri1: rank l + b; the gates are still the unbiased scores) '
        '(variants.scores.selection_scores).', _choice(BIAS_ON))
    group_fill: float = keyword(
        float("-inf"), "the value the group limit writes over the experts of a token's dropped "
        "groups before top-K: -inf (DeepSeek-V3, Megatron-Core: never chosen) or a finite value "
        "(axk2: 0.0, so a dropped expert beats a kept one whose score + bias < 0) "
        "(variants.group_limited.limit_to_groups); needs num_groups.", None)
    normalize_p: float = keyword(
        1.0, "with normalize: divide the K chosen scores by their L_p norm (sum s^p)^(1/p), p > 0 "
        "and finite; 1 is the sum (DBRX's moe_normalize_expert_weights) (topk.gates).",
        _positive())
    normalize_eps: float = keyword(
        0.0, "with normalize: the divisor is norm + eps, eps >= 0 (lfm2_moe: 1e-6; axk2: 1e-20) "
        "(topk.gates).", _checks.nonnegative_finite)

    @property
    def random(self) -> bool:
        """Whether routing draws random numbers (and so needs a seed or a generator)."""
        return (self.priority == "random" or self.second_expert_policy == "random"
                or self.sparsemixer_sampling)


@dataclass(frozen=True)
class ExpertOptions:
    """MoELayer's keywords besides the routing ones (and its sizes, expert_bias, backend, dtype and
    seed): the expert form, the loss weights, the router noise, the formulation, token groups."""
    activation: str = keyword(
        "relu", "the expert form, one of pymoe.expert_forms.EXPERT_FORMS (docs/experts.md): "
        'plain, w1 [E, D, H]: "relu", "gelu" (tanh form), "relu2" (squared relu); gated, w1 [E, D, '
        '2H] = [gate | up]: "swiglu", "geglu", "swiglu_oai" (gpt-oss), "swiglu_clamped", '
        '"swiglu_clamp_after", "swiglu_softcap".', _choice(tuple(EXPERT_FORMS)))
    swiglu_limit: float | None = keyword(
        None, 'L of "swiglu_oai" (default 7), "swiglu_clamped" (10) and "swiglu_clamp_after" '
        "(none; 0 also means none): a finite value > 0; None: the form's default. A ValueError "
        "for the other forms.", _positive_or_zero)
    swiglu_alpha: float | None = keyword(
        None, 'alpha of "swiglu_oai" (> 0, finite; None: 1.702); a ValueError for other forms.',
        _positive(allow_none=True))
    swiglu_softcap: tuple[float, float] | None = keyword(
        None, '(gate cap, up cap) of "swiglu_softcap", each > 0 and finite; None: (4.0, 25.0); '
        "a ValueError for other forms.", _caps)
    aux_loss_coef: float = keyword(0.01, "weight of the load-balancing loss in the objective that "
                                   "backward() differentiates (>= 0).", _checks.nonnegative_finite)
    z_loss_coef: float = keyword(0.0, "weight of the router z-loss (>= 0).",
                                 _checks.nonnegative_finite)
    jitter_eps: float = keyword(0.0, "eps of multiplicative router-input noise U(1-eps, 1+eps), "
                                "in [0, 1).", _checks.nonnegative_finite)
    router_noise: str | None = keyword(
        None, '"none"; "jitter" (jitter_eps); "noisy_topk": Shazeer\'s learned Gaussian logit '
        "noise (variants.noisy, parameter w_noise [D, E], needs k < E) with its load loss "
        "weighted by load_loss_coef. Applied only by forward(x, train=True), drawn from a "
        'generator seeded by seed. None means "jitter" if jitter_eps > 0, else "none".')
    load_loss_coef: float = keyword(0.01, "weight of noisy top-K's load loss (>= 0).",
                                    _checks.nonnegative_finite)
    num_shared_experts: int = keyword(0, "S always-on FFNs in the routed experts' form (hidden "
                                      "size shared_d_hidden) added to the routed output "
                                      "(variants.shared).", _integer(0))
    shared_expert_gate: bool = keyword(False, "gate the shared experts by sigmoid(x . "
                                       "w_shared_gate [D]).", _checks.boolean)
    shared_d_hidden: int | None = keyword(
        None, "Hs, the shared experts' hidden size (>= 1); None: d_hidden. HF fuses S DeepSeek-"
        "style shared experts into one MLP of width S*H: num_shared_experts=1 with that width.",
        lambda n, v: None if v is None else _checks.integer(n, v, low=1))
    shared_swiglu_limit: float | None = keyword(
        None, "the shared experts' swiglu_limit (step3p7 has its own); None: swiglu_limit.",
        _positive_or_zero)
    shared_activation: str | None = keyword(
        None, "the shared experts' form (one of EXPERT_FORMS) when it differs from the routed "
        "experts' (doge: single-neuron silu experts beside a SwiGLU MLP); None: activation.",
        lambda n, v: None if v is None else _checks.choice(n, v, tuple(EXPERT_FORMS)))
    product_keys: str | None = keyword(
        None, "product-key routing (Doge, Lample et al. 2019): the router computes 2n = 2 sqrt(E) "
        "key logits per token (w_router [D, 2n], b_router [2n]) and expert i n + j gets the logit "
        "a_i + b_j (variants.product_keys); 'per_token': a, b = the token's first and last n; "
        "'doge': HF DogeCDMoE's view(2, T, n) of the [T, 2n] logits, which mixes tokens (not "
        "causal, kept by HF for checkpoint parity). E must be a square. None: a [D, E] router.",
        lambda n, v: None if v is None else _checks.choice(n, v, PRODUCT_KEYS))
    shared_combine: str = keyword(
        "sum", '"sum": y = routed + shared; "mean": y = (routed + shared) / 2 (cohere2_moe\'s '
        '"average" strategy).', _choice(SHARED_COMBINES))
    shared_sum_fp32: bool = keyword(
        False, "add routed and shared outputs in float32 and round once to the layer dtype "
        "(hy_v3's enable_moe_fp32_combine). Only float16 layers are affected, and there NumPy's "
        "own float16 add already rounds the float32 sum once: the same bits, kept so that a "
        "loader can state the model's setting.", _checks.boolean)
    gate_input: bool = keyword(
        False, "Llama 4: the gate multiplies each expert's input, y = sum_j FFN_e(gate_j x), "
        "outputs summed unweighted.", _checks.boolean)
    output_bias: bool = keyword(False, "add a bias b_out [D] to the MoE output (JetMoE).",
                                _checks.boolean)
    post_norm: bool = keyword(
        False, "an RMSNorm of the MoE output (routed + shared + b_out), weight post_norm_weight "
        "[D] (y = w * n, initialised to ones; axk1's post_mlp_layernorm), computed in float32 or "
        "wider.", _checks.boolean)
    post_norm_eps: float = keyword(1e-6, "its epsilon (> 0).", _positive())
    formulation: str = keyword(
        "indexed", '"indexed" (gather/scatter; expert matmuls over filled slots only) or "dense" '
        "(the [T, E, C] einsums); both compute the same values.", _choice(FORMULATIONS))
    token_groups: int = keyword(
        1, "G >= 1: G > 1 routes each of G equal contiguous blocks of tokens on its own, with its "
        "own capacity (the GShard group; pymoe.token_groups explains); indexed formulation only.",
        _integer(1))
    dynamic_loss_coef: float = keyword(
        0.0, "weight of top-p routing's dynamic loss, the router entropy averaged over tokens "
        "(variants.top_p.dynamic_loss; the paper uses 1e-4), in the objective backward() "
        "differentiates (>= 0); needs top_p.", _checks.nonnegative_finite)
    load_stats: str = keyword('local', '"local" (each group\'s own f_e, P_e in the aux loss) or '
                              '"global" (over all groups); with token_groups > 1.',
                              _choice(LOAD_STATS))
    identity_experts: int = keyword(
        0, "Z zero-computation identity experts, after the real ones: expert e in [Er, Er + Z) "
        "outputs its input, so a token adds gate * x (LongCat-Flash's zero experts, MoE++). "
        "Er = E - Z - null_experts real experts hold the parameters (w1, b1, w2, b2 have Er "
        "rows); the router scores all E and the zero-computation experts are chosen, "
        "capacity-limited and counted in the loads like the others (variants.zero_experts).",
        _integer(0))
    null_experts: int = keyword(
        0, "N null (skip) experts, the last N: expert e in [E - N, E) outputs 0, so choosing it "
        "spends a choice on nothing (zaya's skip expert); routed and counted like the others.",
        _integer(0))
    shared_router_scored: bool = keyword(
        False, "Inkling's joint normalisation (C6): the router scores the S shared experts too "
        "(w_router [D, E + S], b_router [E + S], the shared ones last); s = sigmoid of all E + S; "
        "the K chosen and the S shared scores are normalised together, gate_j = c s_j / (sum_K s "
        "+ sum_S s), gamma_s = c s_s / (the same), c = scaling_factor * global_scale (a learned "
        "parameter [1]), and each shared expert's output is weighed by its gamma_s "
        "(variants.joint_shared). Needs score='sigmoid', normalize=False, num_shared_experts >= "
        "1, the indexed formulation.", _checks.boolean)
    logit_multiplier: float | None = keyword(
        None, "multiplies the router logits before routing, logits = (x @ w_router + b_router) * "
        "m (MuseSpark's output_multiplier, 1/sqrt(32)); routing.router_logits are the multiplied "
        "ones. None: no multiplier.", _positive(allow_none=True))
    latent_dim: int | None = keyword(
        None, "Dm: a latent MoE (MuseSpark, NemotronH's moe_latent_size): the experts read "
        "x @ w_latent_in [D, Dm] and the combined output is projected back by w_latent_out "
        "[Dm, D]; the experts' w1 is [E, Dm, W], w2 [E, H, Dm], b2 [E, Dm]; the router and the "
        "shared experts read x (variants.latent). None: none.",
        lambda n, v: None if v is None else _checks.integer(n, v, low=1))
    latent_norm: bool = keyword(
        False, "a centred RMSNorm of the latent input, rms(x @ w_latent_in) * (1 + "
        "latent_norm_weight [Dm]) (MuseSpark's pre_expert_norm); needs latent_dim.",
        _checks.boolean)
    latent_norm_eps: float = keyword(1e-5, "its epsilon (> 0).", _positive())
    expert_post_norm: bool = keyword(
        False, "an RMSNorm of each expert's output before its gate weighs it, rms(o * (1 + "
        "expert_post_norm_weight)), one weight [D or Dm] for all experts (MuseSpark's "
        "post_expert_norm), in float32 or wider.", _checks.boolean)
    expert_post_norm_eps: float = keyword(1e-8, "its epsilon (> 0).", _positive())
    router_mlp: int | None = keyword(
        None, "R: Zaya's MLP router instead of x @ w_router + b_router: h = x @ w_router_down "
        "[D, R] + b_router_down (+ the previous layer's router state * router_state_scale [R]), "
        "an RMSNorm (router_norm_weight [R]), two Linear(R, R) + exact GELU (w_router_fc1, "
        "w_router_fc2 and their biases), then w_router [R, E] (variants.router_mlp). h is this "
        "layer's router state (layer.router_state). None: the linear router.",
        lambda n, v: None if v is None else _checks.integer(n, v, low=1))
    router_mlp_eps: float = keyword(1e-5, "its RMSNorm's epsilon (> 0).", _positive())
    router_state_input: bool = keyword(
        False, "the MLP router adds the previous layer's state, forward(x, router_state=s) "
        "(Zaya's layers after the first; parameter router_state_scale [R]); needs router_mlp.",
        _checks.boolean)

    # issue 23: router-input transforms and jitter that reaches the experts (docs/variants.md)
    router_softcap: float | None = keyword(
        None, "c > 0: the router logits are soft-capped, l -> c tanh(l / c), before routing "
        "(laguna's moe_router_logit_softcapping); routing.router_logits are the capped ones. "
        "None: no cap.", _positive(allow_none=True))
    jitter_experts: bool = keyword(
        False, "with router_noise='jitter': the experts (and shared experts) see the jittered x "
        "too, x * U(1-eps, 1+eps) in the layer dtype, as HF Mixtral, MiniMax, DBRX, Switch "
        "(float32) and PhiMoE jitter their input in place; False: only the router's copy.",
        _checks.boolean)
    # issue 23: Gemma 4's MoE branch (gemma4, diffusion_gemma; pymoe.variants.input_norm)
    router_input_norm: bool = keyword(
        False, "the router reads RMSNorm(x) * router_norm_scale [D] * D^-1/2 instead of x "
        "(Gemma4TextRouter; router_norm_scale a parameter, initialised to ones).",
        _checks.boolean)
    expert_input_norm: bool = keyword(
        False, "the experts (and shared experts) read RMSNorm(x) * expert_norm_weight [D] "
        "instead of x (Gemma 4's pre_feedforward_layernorm_2; initialised to ones).",
        _checks.boolean)
    input_norm_eps: float = keyword(1e-6, "the epsilon of both input norms (> 0).", _positive())
    gate_scale: bool = keyword(
        False, "each gate times a learned per-expert scale, g_j * gate_scale[e_j] (parameter "
        "gate_scale [E], initialised to ones; Gemma 4's per_expert_scale); indexed formulation.",
        _checks.boolean)
    # issue 23: modality-isolated expert sets (ernie4_5_vl_moe)
    modality_sets: int = keyword(
        1, "M >= 1 expert sets of E / M experts each (set m: experts m E/M .. (m+1) E/M - 1); "
        "M > 1: forward(x, token_types=) routes each token among its type's set only (its "
        "logits at the other sets' experts are -inf: softmax over its own set, never chosen "
        "whatever the bias; ernie4_5_vl_moe's text and vision experts). token_types None: every "
        "token is of type 0. Needs K <= E / M, selection='tokens', no groups.", _integer(1))

ROUTE_KEYWORDS = tuple(f.name for f in dataclasses.fields(RouteOptions))
EXPERT_KEYWORDS = tuple(f.name for f in dataclasses.fields(ExpertOptions))


def describe_options(opts: Any) -> str:
    """'score='sigmoid', normalize=True' for the keywords of `opts` (a RouteOptions or an
    ExpertOptions) that differ from their defaults, 'default options' when none do; k is left out
    (the caller says it)."""
    changed = [f"{f.name}={getattr(opts, f.name)!r}" for f in dataclasses.fields(opts)
               if f.name != "k" and getattr(opts, f.name) != f.default]
    return ", ".join(changed) if changed else "default options"


def device_keywords() -> tuple[str, ...]:
    """The routing keywords the CUDA device route runs (besides k and capacity_factor)."""
    return tuple(f.name for f in dataclasses.fields(RouteOptions) if f.metadata["device"])


def defaults(cls: type) -> dict[str, Any]:
    """Each keyword of RouteOptions or ExpertOptions with its default."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def keywords_doc(cls: type, skip: tuple[str, ...] = ()) -> str:
    """The Args lines of cls's keywords, for route()'s and MoELayer's docstrings."""
    return "".join(textwrap.fill(f"{f.name}: {f.metadata['doc']} Default {f.default!r}.", 100,
                                 initial_indent=" " * 8, subsequent_indent=" " * 12) + "\n"
                   for f in dataclasses.fields(cls) if f.name not in skip)


def add_flags(parser: Any, cls: type) -> tuple[str, ...]:
    """An argparse flag (--name-with-dashes) for each keyword of cls that has a cli entry; returns
    their names."""
    names = []
    for f in dataclasses.fields(cls):
        if f.metadata["cli"] is not None:
            kind, help_text = f.metadata["cli"]
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, help=help_text)
            names.append(f.name)
    return tuple(names)


def flag_values(args: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The flags of add_flags that were given on the command line, as keywords."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def split_keywords(func: str, keywords: Mapping[str, Any],
                   *classes: type) -> tuple[dict[str, Any], ...]:
    """keywords sorted into one dict per options class; an unknown one is a TypeError naming it, as
    Python's own for a keyword the signature does not have."""
    out: list[dict[str, Any]] = [{} for _ in classes]
    names = [set(f.name for f in dataclasses.fields(c)) for c in classes]
    for name, value in keywords.items():
        for i, known in enumerate(names):
            if name in known:
                out[i][name] = value
                break
        else:
            raise TypeError(f"{func}() got an unexpected keyword argument {name!r}")
    return tuple(out)


def _checked_fields(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every keyword of cls that has its own check, checked, in the order of the fields."""
    return {f.name: f.metadata["check"](f.name, given.get(f.name, f.default))
            for f in dataclasses.fields(cls) if f.metadata["check"] is not None}


def route_options(num_experts: int, k: object, capacity_factor: object = 1.25,
                  **keywords: Any) -> RouteOptions:
    """Check every routing keyword against E and each other; each error names its argument."""
    (given,) = split_keywords("route_options", keywords, RouteOptions)
    given.pop("k", None)
    given.pop("capacity_factor", None)
    g = {**defaults(RouteOptions), **given}
    E = num_experts
    k = _checks.integer("k", k, low=1, high=E)
    cf, min_c, rule, fixed = capacity_args(capacity_factor, g["min_capacity"], g["capacity_rule"],
                                           g["capacity"])
    opts: dict[str, Any] = dict(capacity_factor=cf, min_capacity=min_c, capacity_rule=rule,
                                capacity=fixed)
    opts.update(_checked_fields(RouteOptions, g))
    opts.update(_group_options(E, k, g["num_groups"], g["topk_groups"], g["group_score_k"]))
    sequence_length = g["sequence_length"]
    if opts["load_balancing"] == "sequence":
        if sequence_length is None:
            raise ValueError("sequence_length: required with load_balancing='sequence' (tokens "
                             "per sequence; T must be a multiple of it)")
        opts["sequence_length"] = _checks.integer("sequence_length", sequence_length, low=1)
    elif sequence_length is not None:
        raise ValueError("sequence_length: only used with load_balancing='sequence'")
    if opts["second_expert_policy"] != "all" and k != 2:
        raise ValueError(f"second_expert_policy: {opts['second_expert_policy']!r} is GShard's "
                         f"top-2 policy and needs k = 2, got k = {k}")
    if opts["selection"] != "tokens":
        sel = opts["selection"]
        if opts.get("num_groups") is not None:
            raise ValueError(f"num_groups: group-limited top-K needs selection='tokens', got {sel!r}")
        if opts["second_expert_policy"] != "all":
            raise ValueError(f"second_expert_policy: needs selection='tokens', got {sel!r}")
    _switch_options(opts, g["group_fill"])
    _sparsemixer_options(opts, g)
    if opts["selection"] == "experts" and opts["padding"] != "absent":
        raise ValueError(f"padding: expert choice (selection='experts') takes padding as absent "
                         f"only, got padding={opts['padding']!r}")
    if opts["selection"] == "experts":
        if opts["capacity_factor"] is None and opts["capacity"] is None:
            raise ValueError("capacity_factor: expert choice needs a capacity (each expert takes "
                             "its top-C tokens); got None (dropless)")
        if opts["priority"] not in ("choice", "token") or opts["drop_policy"] != "position":
            raise ValueError("priority: expert choice fills slots in token order by its own rule "
                             "(each expert's top-C tokens); leave priority and drop_policy at "
                             "their defaults")
    _top_p_options(opts)
    _relu_options(opts)
    return RouteOptions(k=k, **opts)


def _switch_options(opts: dict[str, Any], group_fill: object) -> None:
    """expert_bias_on, group_fill, normalize_p, normalize_eps against the options they modify."""
    if isinstance(group_fill, (bool, np.bool_)) or not isinstance(group_fill, numbers.Real):
        raise TypeError(f"group_fill: expected a float (-inf or finite), got {group_fill!r}")
    fill = float(group_fill)
    if np.isnan(fill) or fill == float("inf"):
        raise ValueError(f"group_fill: expected -inf or a finite value, got {fill}")
    if fill != float("-inf") and opts.get("num_groups") is None:
        raise ValueError("group_fill: only used with num_groups (group-limited top-K)")
    opts["group_fill"] = fill
    for kw, unset in (("normalize_p", 1.0), ("normalize_eps", 0.0)):
        if opts[kw] != unset and not opts["normalize"]:
            raise ValueError(f"{kw}: only used with normalize=True, got {kw}={opts[kw]!r}")


def _relu_options(o: dict[str, Any]) -> None:
    """selection="relu" against the keywords it cannot run with, each refused by name."""
    if o["selection"] != "relu":
        return
    for kw, unset, why in (
            ("score", "softmax", "its gates are relu(logits), no score function"),
            ("normalize", False, "its gates are relu(logits) themselves"),
            ("load_balancing", "switch", "its regulariser is the Switch form on the relu gates")):
        if o[kw] != unset:
            raise ValueError(f"{kw}: selection='relu' (ReMoE) needs {kw}={unset!r} ({why}), "
                             f"got {o[kw]!r}")


def _top_p_options(o: dict[str, Any]) -> None:
    """top_p against the keywords it cannot run with, each refused by name."""
    if o["top_p"] is None:
        return
    for kw, unset, why in (
            ("score", "softmax", "the mass is of softmax probabilities"),
            ("selection", "tokens", "it picks experts per token"),
            ("normalize", False, "its gates are the probabilities themselves (the paper's); "
             "renormalize_after_drop=True renormalises over the taken experts"),
            ("second_expert_policy", "all", "it decides the second expert itself"),
            ("num_groups", None, "group-limited top-K is not part of it")):
        if o.get(kw, unset) != unset:
            raise ValueError(f"{kw}: top_p needs {kw}={unset!r} ({why}), got {o[kw]!r}")
    if o["load_balancing"] not in ("switch", "first_choice"):
        raise ValueError(f"load_balancing: top_p takes 'switch' (f over the selected pairs) or "
                         f"'first_choice', got {o['load_balancing']!r}")


def _sparsemixer_options(opts: dict[str, Any], given: Mapping[str, Any]) -> None:
    """SparseMixer's keywords need selection="sparsemixer", and it computes its own gates: a
    softmax score, no renormalisation over K (each pick has its own softmax)."""
    if opts["selection"] != "sparsemixer":
        for kw in ("sparsemixer_eps", "sparsemixer_sampling"):
            if given[kw] != defaults(RouteOptions)[kw]:
                raise ValueError(f"{kw}: only read with selection='sparsemixer', got selection="
                                 f"{opts['selection']!r}")
        return
    for kw, unset in (("score", "softmax"), ("normalize", False),
                      ("renormalize_after_drop", False)):
        if opts[kw] != unset:
            raise ValueError(f"{kw}: selection='sparsemixer' gates each pick by its own masked "
                             f"softmax; leave {kw} at {unset!r}, got {opts[kw]!r}")


def _group_options(E: int, k: int, num_groups: object, topk_groups: object,
                   group_score_k: object) -> dict:
    if num_groups is None:
        if topk_groups is not None or group_score_k is not None:
            raise ValueError("num_groups: required when topk_groups or group_score_k is given")
        return {}
    G = _checks.integer("num_groups", num_groups, low=1)
    if E % G:
        raise ValueError(f"num_groups: must divide the number of experts E = {E}, got {G}")
    if topk_groups is None:
        raise ValueError("topk_groups: required with num_groups (how many groups each token "
                         "may use)")
    tg = _checks.integer("topk_groups", topk_groups, low=1, high=G)
    if tg * (E // G) < k:
        raise ValueError(f"topk_groups: {tg} groups of {E // G} experts hold fewer than k = {k} "
                         "experts (need topk_groups * E / num_groups >= k)")
    if group_score_k is None:
        gk = max(k // tg, 1)
    else:
        gk = _checks.integer("group_score_k", group_score_k, low=1, high=E // G)
    return dict(num_groups=G, topk_groups=tg, group_score_k=min(gk, E // G))


def expert_options(route: RouteOptions, num_experts: int, **keywords: Any) -> ExpertOptions:
    """Check MoELayer's own keywords (after the routing ones: some depend on them)."""
    (given,) = split_keywords("expert_options", keywords, ExpertOptions)
    g = {**defaults(ExpertOptions), **given}
    o = _checked_fields(ExpertOptions, g)
    if o["jitter_eps"] >= 1.0:
        raise ValueError(f"jitter_eps: expected a value in [0, 1), got {o['jitter_eps']}")
    noise = g["router_noise"]
    if noise is None:
        noise = "jitter" if o["jitter_eps"] > 0 else "none"
    o["router_noise"] = _checks.choice("router_noise", noise, ROUTER_NOISE)
    if o["router_noise"] == "jitter" and o["jitter_eps"] == 0:
        raise ValueError("jitter_eps: router_noise='jitter' needs jitter_eps > 0 (1e-2 in "
                         "Mesh-TF and DeepSpeed)")
    if o["router_noise"] == "noisy_topk" and route.k >= num_experts:
        raise ValueError(f"router_noise: 'noisy_topk' needs k < E (its load estimate "
                         f"compares with the (k+1)-th logit), got k = {route.k}, "
                         f"E = {num_experts}")
    if o["jitter_experts"] and o["router_noise"] != "jitter":
        raise ValueError("jitter_experts: needs router_noise='jitter' (jitter_eps > 0), got "
                         f"router_noise={o['router_noise']!r}")
    if o["router_softcap"] is not None:
        if o["router_noise"] == "noisy_topk":
            raise ValueError("router_softcap: not with router_noise='noisy_topk' (which would "
                             "add its noise to the capped logits)")
        if route.router_dtype in ("bfloat16", "float16"):
            raise ValueError(f"router_softcap: route() rounds the logits it is given to "
                             f"router_dtype={route.router_dtype!r}, which would round the capped "
                             "ones; use router_dtype None, 'float32' or 'float64'")
    for kw in ("router_input_norm", "expert_input_norm"):
        if o[kw] and o["router_noise"] != "none":
            raise ValueError(f"{kw}: not with router noise (got router_noise="
                             f"{o['router_noise']!r}): Gemma 4 has none")
    if o["gate_scale"] and (o["formulation"] != "indexed" or o["gate_input"]):
        raise ValueError("gate_scale: runs in the indexed formulation without gate_input")
    if o["gate_scale"] and o["shared_router_scored"]:
        raise ValueError("gate_scale: not with shared_router_scored (Inkling's joint gates are "
                         "normalised with the shared ones; no family scales them per expert)")
    M = o["modality_sets"]
    if M > 1:
        if num_experts % M or route.k > num_experts // M:
            raise ValueError(f"modality_sets: {M} sets need E a multiple of {M} with K <= E / M, "
                             f"got E = {num_experts}, K = {route.k}")
        if route.selection != "tokens" or route.num_groups is not None or \
                o["router_noise"] == "noisy_topk":
            raise ValueError("modality_sets: needs selection='tokens', no num_groups and no "
                             "noisy top-K")
    if o["dynamic_loss_coef"] and route.top_p is None:
        raise ValueError("dynamic_loss_coef: top-p routing's dynamic loss needs top_p")
    if route.sparsemixer_sampling:
        raise ValueError("sparsemixer_sampling: MoELayer samples SparseMixer's picks in "
                         "forward(x, train=True) and takes the best ones otherwise; leave it False")
    if o["product_keys"] is not None:
        n = int(round(num_experts ** 0.5))
        if n * n != num_experts:
            raise ValueError(f"product_keys: needs a square number of experts (E = n^2, n keys "
                             f"per half), got E = {num_experts}")
        if o["router_noise"] == "noisy_topk" or o["token_groups"] > 1:
            raise ValueError("product_keys: not supported with router_noise='noisy_topk' or "
                             "token_groups > 1 (both take a [D, E] router)")
        for kw, unset in (("shared_router_scored", False), ("router_mlp", None)):
            if o[kw] != unset:
                raise ValueError(f"product_keys: not with {kw} (Doge's router is one linear map "
                                 "to the 2 sqrt(E) keys)")
    if o["shared_expert_gate"] and o["num_shared_experts"] == 0:
        raise ValueError("shared_expert_gate: needs num_shared_experts >= 1")
    _form_options(o)
    if o["identity_experts"] + o["null_experts"] >= num_experts:
        raise ValueError(f"identity_experts: identity_experts + null_experts = "
                         f"{o['identity_experts'] + o['null_experts']} leaves no real expert of "
                         f"E = {num_experts}; at least one expert must have parameters")
    if o["shared_router_scored"]:
        _joint_options(route, o)
    if o["router_mlp"] is None and o["router_state_input"]:
        raise ValueError("router_state_input: needs router_mlp (the state enters the MLP router)")
    if o["router_mlp"] is not None and o["router_noise"] == "noisy_topk":
        raise ValueError("router_noise: 'noisy_topk' needs the linear router, not router_mlp")
    if o["latent_dim"] is None and o["latent_norm"]:
        raise ValueError("latent_norm: needs latent_dim (the norm is of the latent input)")
    if (o["latent_dim"] is not None or o["expert_post_norm"]) and o["gate_input"]:
        raise ValueError("gate_input: not supported with latent_dim or expert_post_norm (the gate "
                         "would weigh the latent input)")
    if o["token_groups"] > 1:
        if o["formulation"] != "indexed":
            raise ValueError("token_groups: groups run in the indexed formulation only, got "
                             f"formulation={o['formulation']!r}")
        check_token_groups("token_groups", route, o["router_noise"], o["load_stats"])
        check_group_extras("token_groups", o)
    return ExpertOptions(**o)


def _joint_options(route: RouteOptions, o: dict[str, Any]) -> None:
    """shared_router_scored against what its step reads (each a ValueError naming it)."""
    wants = {"score": (route.score, "sigmoid"), "normalize": (route.normalize, False),
             "selection": (route.selection, "tokens"), "formulation": (o["formulation"], "indexed"),
             "shared_expert_gate": (o["shared_expert_gate"], False),
             "gate_input": (o["gate_input"], False), "router_noise": (o["router_noise"], "none")}
    for name, (got, want) in wants.items():
        if got != want:
            raise ValueError(f"shared_router_scored: needs {name}={want!r} (the joint "
                             f"normalisation replaces it), got {name}={got!r}")
    if o["num_shared_experts"] == 0:
        raise ValueError("shared_router_scored: needs num_shared_experts >= 1")


def check_group_extras(who: str, o: Any) -> None:
    """The layer extras the token-group step (MoELayer(token_groups > 1), ExpertParallelMoE)
    does not run: it runs the routed experts and adds the shared ones, nothing else. `o`: the
    ExpertOptions fields as a dict, or an object with them as attributes."""
    get = o.get if isinstance(o, dict) else lambda n: getattr(o, n)
    for extra, unset in (("gate_input", False), ("output_bias", False), ("post_norm", False),
                         ("shared_combine", "sum"), ("shared_sum_fp32", False),
                         ("router_softcap", None), ("jitter_experts", False),
                         ("router_input_norm", False), ("expert_input_norm", False),
                         ("gate_scale", False), ("modality_sets", 1),
                         ("identity_experts", 0), ("null_experts", 0),
                         ("shared_router_scored", False), ("logit_multiplier", None),
                         ("latent_dim", None), ("expert_post_norm", False),
                         ("router_mlp", None), ("product_keys", None)):
        if get(extra) != unset:
            raise ValueError(f"{extra}: not supported with token groups or expert parallelism "
                             f"({who}: they add the shared experts' output to the routed one and "
                             f"nothing else), got {extra}={get(extra)!r}")


def _form_options(o: dict[str, Any]) -> None:
    """The form keywords against the form that reads them, and the shared-expert ones against
    num_shared_experts; each error names its keyword."""
    form = EXPERT_FORMS[o["activation"]]
    for kw in ("swiglu_limit", "swiglu_alpha", "swiglu_softcap"):
        if o[kw] is not None and kw not in form.keywords:
            users = [n for n, f in EXPERT_FORMS.items() if kw in f.keywords]
            raise ValueError(f"{kw}: the form activation={form.name!r} has no such argument "
                             f"(it is read by {', '.join(map(repr, users))})")
    zero_ok = form.name == "swiglu_clamp_after"
    for kw in ("swiglu_limit", "shared_swiglu_limit"):
        if o[kw] == 0.0 and not zero_ok:
            raise ValueError(f"{kw}: expected a finite value > 0, got 0.0 (0 means no limit "
                             "only for 'swiglu_clamp_after')")
    S = o["num_shared_experts"]
    for kw, unset in (("shared_d_hidden", None), ("shared_swiglu_limit", None),
                      ("shared_activation", None),
                      ("shared_combine", "sum"), ("shared_sum_fp32", False)):
        if o[kw] != unset and S == 0:
            raise ValueError(f"{kw}: needs num_shared_experts >= 1")
    shared = EXPERT_FORMS[o["shared_activation"] or o["activation"]]
    if o["shared_swiglu_limit"] is not None and "swiglu_limit" not in shared.keywords:
        raise ValueError(f"shared_swiglu_limit: the shared form {shared.name!r} has no limit")
    if shared.keywords and shared is not form:
        raise ValueError(f"shared_activation: {shared.name!r} takes arguments "
                         f"({', '.join(shared.keywords)}) the routed form does not share; pick "
                         "a shared form without arguments")


def check_token_groups(who: str, route: RouteOptions, router_noise: str, load_stats: str) -> None:
    """What the token-group step (pymoe.token_groups: MoELayer(token_groups > 1) and
    ExpertParallelMoE alike) does not run, each a ValueError starting with `who`."""
    if router_noise == "noisy_topk":
        raise ValueError(f"{who}: token groups and expert parallelism do not support "
                         "router_noise='noisy_topk' (its load loss and w_noise would get no "
                         "gradient); use 'jitter' or 'none'")
    if route.top_p is not None or route.selection == "relu":
        raise ValueError(f"{who}: token groups and expert parallelism do not support top_p or "
                         "selection='relu' (dynamic-K routing runs in route() and MoELayer "
                         "with token_groups=1)")
    if route.selection == "experts":
        raise ValueError(f"{who}: token groups and expert parallelism do not support expert "
                         "choice (selection='experts'); use 'tokens' or 'sinkhorn'")
    if route.selection == "sparsemixer":
        raise ValueError(f"{who}: token groups and expert parallelism do not support "
                         "SparseMixer (selection='sparsemixer'); use 'tokens' or 'sinkhorn'")
    if load_stats == "global" and (route.score != "softmax" or route.load_balancing != "switch"):
        raise ValueError("load_stats: 'global' statistics use the softmax Switch loss; got "
                         f"score={route.score!r}, load_balancing={route.load_balancing!r}")


def expert_bias_arg(expert_bias: object, num_experts: int) -> np.ndarray | None:
    """expert_bias: None or a finite float array of shape [E]."""
    if expert_bias is None:
        return None
    return _checks.float_array("expert_bias", expert_bias, ndim=1, shape=(num_experts,))


def replay_arg(replay: object, num_tokens: int, k: int, num_experts: int) -> np.ndarray | None:
    """replay: None or a `<int64>[T, K]` selection to force (a Routing's expert_index recorded
    earlier): integers in [0, E), no expert twice in a row. Returns a fresh C-contiguous copy."""
    if replay is None:
        return None
    if not isinstance(replay, (np.ndarray, list, tuple)):
        raise TypeError(f"replay: expected an int array [T, K] (a routing's expert_index) or "
                        f"None, got {type(replay).__name__}")
    a = np.asarray(replay)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"replay: expected an integer array (a routing's expert_index), got "
                        f"dtype {a.dtype}")
    if a.shape != (num_tokens, k):
        raise ValueError(f"replay: expected shape [T, K] = [{num_tokens}, {k}], got "
                         f"{list(a.shape)}")
    a = np.ascontiguousarray(a, dtype=np.int64)  # [T, K]
    if a.size and (a.min() < 0 or a.max() >= num_experts):
        bad = np.argwhere((a < 0) | (a >= num_experts))[0]
        raise ValueError(f"replay: expert indices must lie in [0, E) = [0, {num_experts}), got "
                         f"{a[tuple(bad)]} at token {bad[0]}, choice {bad[1]}")
    if k > 1 and a.size:
        s = np.sort(a, axis=-1)  # [T, K]
        dup = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=-1))  # tokens
        if dup.size:
            raise ValueError(f"replay: token {dup[0]} lists an expert twice ({a[dup[0]].tolist()}"
                             f"); a selection names K distinct experts per token")
    return a


def hash_table_arg(hash_table: object, num_experts: int, k: int) -> np.ndarray | None:
    """hash_table: None or DeepSeek-V4's frozen token-id -> experts table (HF `tid2eid`),
    `<int>[V, K]`: row v lists the K distinct experts in [0, E) every token with id v goes to.
    Returns a read-only int64 copy."""
    if hash_table is None:
        return None
    a = np.asarray(hash_table)
    if a.ndim != 2 or a.shape[1] != k:
        raise ValueError(f"hash_table: expected shape [V, K] = [V, {k}] (K experts per token "
                         f"id), got {list(a.shape)}")
    a = _checks.index_array("hash_table", a, shape=(None, k), high=num_experts).copy()
    if k > 1 and a.size:
        s = np.sort(a, axis=-1)
        dup = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=-1))
        if dup.size:
            raise ValueError(f"hash_table: token id {dup[0]} lists an expert twice "
                             f"({a[dup[0]].tolist()}); each row names K distinct experts")
    a.flags.writeable = False
    return a


def token_ids_arg(token_ids: object, shape: tuple[int, ...],
                  hash_table: np.ndarray | None) -> np.ndarray | None:
    """token_ids: the tokens' ids `<int>` of the tokens' shape, each in [0, V) of a checked
    hash_table `[V, K]` -> `<int64>[T]` flattened; both or neither must be given."""
    if token_ids is None:
        if hash_table is not None:
            raise ValueError("token_ids: hash routing (hash_table given) chooses the experts by "
                             "token id; pass token_ids, the ids of the tokens routed")
        return None
    if hash_table is None:
        raise ValueError("token_ids: only read by hash routing; pass hash_table, the token-id "
                         "-> experts table (MoELayer(hash_table=...))")
    ids = np.asarray(token_ids)
    if ids.dtype.kind not in "iu" or ids.dtype == np.bool_:
        raise TypeError(f"token_ids: expected an integer array, got dtype {ids.dtype}")
    if ids.shape != tuple(shape):
        raise ValueError(f"token_ids: expected shape {tuple(shape)} (one id per token), got "
                         f"{ids.shape}")
    V = hash_table.shape[0]
    return _checks.index_array("token_ids", ids.reshape(-1), shape=(None,), high=V)


def hash_selection(hash_table: np.ndarray | None, token_ids: np.ndarray | None,
                   replay: object) -> np.ndarray | None:
    """The `<int64>[T, K]` hash-routed selection hash_table[token_ids] (checked arguments),
    or None without hash routing; hash routing and replay both force the selection, so
    together they are refused."""
    if hash_table is None:
        return None
    if replay is not None:
        raise ValueError("replay: hash routing already fixes the selection (hash_table["
                         "token_ids]); pass one of replay and token_ids")
    assert token_ids is not None
    return np.ascontiguousarray(hash_table[token_ids])  # [T, K]


def token_mask_arg(token_mask: object, shape: tuple[int, ...],
                   name: str = "token_mask") -> np.ndarray | None:
    """token_mask: None or a bool array of the tokens' shape (True = a real token, the HF
    attention_mask convention) with at least one real token -> `<bool>[T]` flattened, or None."""
    if token_mask is None:
        return None
    m = np.asarray(token_mask)
    if m.dtype != np.bool_:
        raise TypeError(f"{name}: expected a bool array (True = a real token, False = padding), "
                        f"got dtype {m.dtype}")
    if m.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (one entry per token), got "
                         f"{m.shape}")
    if m.size and not m.any():
        raise ValueError(f"{name}: every one of the {m.size} tokens is padding (all False); "
                         "pass at least one real token")
    return np.ascontiguousarray(m.reshape(-1))


def generator_arg(seed: object, needed: bool) -> np.random.Generator | None:
    """seed: None, an int >= 0 or a numpy Generator; required when routing is random."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        if needed:
            raise ValueError("seed: priority='random' and second_expert_policy='random' draw "
                             "random numbers; pass an int seed or a numpy Generator")
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, a numpy Generator or None, got "
                        f"{type(seed).__name__}")
    return np.random.default_rng(_checks.integer("seed", seed, low=0))


@dataclass(frozen=True)
class SoftMoEOptions:
    """pymoe.SoftMoELayer's own keywords (Puigcerver et al. 2023, "From Sparse to Soft Mixtures
    of Experts"); its experts take ExpertOptions' form keywords (activation, swiglu_*)."""
    num_slots: int = keyword(1, "S slots per expert (>= 1): the layer has E*S slots, each a "
                             "softmax-over-tokens mix of every token.", _integer(1))
    normalize: bool = keyword(
        True, "normalise tokens and slot embeddings before their dot product (the paper's "
        "sec. 2.3 l2 normalisation; here RMSNorm = l2norm(v) * sqrt(D) * weight, weights "
        "norm_weight [D] and slot_norm_weight [D] initialised to ones, as soft-moe-pytorch); "
        "False: raw dot products (the paper's Algorithm 1).", _checks.boolean)


SOFT_MOE_KEYWORDS = tuple(f.name for f in dataclasses.fields(SoftMoEOptions))
SOFT_MOE_FORM_KEYWORDS = ("activation", "swiglu_limit", "swiglu_alpha", "swiglu_softcap")


def soft_moe_options(**keywords: Any) -> tuple[SoftMoEOptions, ExpertOptions]:
    """SoftMoELayer's keywords, checked: its own, and the expert-form ones of ExpertOptions; any
    other ExpertOptions or RouteOptions keyword is refused by name (Soft MoE has no routing)."""
    own, form, other = split_keywords("SoftMoELayer", keywords, SoftMoEOptions, ExpertOptions,
                                      RouteOptions)
    for name in [*other, *(n for n in form if n not in SOFT_MOE_FORM_KEYWORDS)]:
        raise ValueError(f"{name}: Soft MoE has no routing, capacity or routing losses (every "
                         "token reaches every slot); it takes num_slots, normalize and the "
                         f"expert-form keywords {', '.join(SOFT_MOE_FORM_KEYWORDS)}")
    g = {**defaults(SoftMoEOptions), **own}
    experts = expert_options(route_options(1, 1), 1, **form)
    return SoftMoEOptions(**_checked_fields(SoftMoEOptions, g)), experts
