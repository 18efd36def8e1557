"""Presets: one name per system, bundling the routing conventions that system uses.

`preset(name, **overrides)` returns a frozen Preset; `route(..., preset=...)` and
`MoELayer(..., preset=...)` take a name or a Preset, and keywords passed explicitly win over the
preset's conventions. docs/conventions.md says what each system does, where in its source, and how
each preset is checked against that system's own code.
"""
from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .. import _checks
from ..options import ExpertOptions, RouteOptions, defaults

F = TypeVar("F", bound=Callable[..., Any])

# What a preset can set: every route() / MoELayer keyword (pymoe.options) but K, and route()'s
# seed for random rules (None: not random). A preset's own default capacity factor is 1.0 (the
# systems' common default); every other default is route()'s.
CONVENTIONS: dict[str, Any] = {**{n: v for n, v in defaults(RouteOptions).items() if n != "k"},
                               "capacity_factor": 1.0, "seed": None, **defaults(ExpertOptions)}


@dataclass(frozen=True, init=False)
class Preset:
    """A system's routing conventions, as pymoe.route / MoELayer keywords (docs/conventions.md).

    `Preset(name, source, **conventions)`: the keywords (pymoe.options.RouteOptions and
    ExpertOptions, and seed) the system sets; every other keyword keeps its default. Each one reads
    as an attribute (`preset.priority`). Two need K: normalize=None means "when K > 1" (Tutel and
    Megatron-Core: a renormalised single gate is the constant 1 and passes no gradient), and
    GShard's second-expert policy is used only when K = 2. `k`: the K the system's gating
    function is written for (Switch and DeepSpeed top-1: 1; GShard, DeepSpeed top-2, NLLB: 2),
    None where K is a configuration value; routing at another K warns (the system never does).
    """
    name: str
    source: str  # where the system implements it (file: function)
    k: int | None  # the K its gating function is written for; None: any (a config value)
    conventions: dict[str, Any]  # keyword -> value, only those the system sets

    def __init__(self, name: str, source: str, k: int | None = None, **conventions: Any) -> None:
        unknown = sorted(set(conventions) - set(CONVENTIONS))
        if unknown:
            raise TypeError(f"preset: unknown field(s) {', '.join(unknown)}; a Preset has "
                            f"{', '.join(sorted(CONVENTIONS))}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "k", None if k is None else _checks.integer("k", k, low=1))
        object.__setattr__(self, "conventions", dict(conventions))

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields
        if name in CONVENTIONS and "conventions" in self.__dict__:
            return self.__dict__["conventions"].get(name, CONVENTIONS[name])
        raise AttributeError(f"'Preset' object has no attribute {name!r}")

    def __hash__(self) -> int:
        return hash((self.name, self.source, self.k, tuple(sorted(self.conventions.items()))))

    def __str__(self) -> str:
        rows = [f"{n:24s} {getattr(self, n)!r}{'' if n in self.conventions else '  (default)'}"
                for n in CONVENTIONS]
        return "\n".join([f"pymoe preset: {'name':18s} {self.name!r}",
                          f"{'source':24s} {self.source}",
                          f"{'k':24s} {self.k!r}{'' if self.k else '  (any: a config value)'}",
                          "conventions:", *rows])

    def keywords(self, k: int) -> dict[str, Any]:
        """The route() / MoELayer keywords this preset stands for, for K choices per token."""
        kw = {n: getattr(self, n) for n in CONVENTIONS}
        if kw["normalize"] is None:
            kw["normalize"] = k > 1
        if k != 2:  # GShard's second-expert policy is a top-2 rule
            kw["second_expert_policy"] = "all"
        return kw


HF = "transformers/models"
_PRESETS = {p.name: p for p in [
    Preset("switch", "mesh_tensorflow/transformer/moe.py: _switch_gating; "
           f"{HF}/switch_transformers/modeling_switch_transformers.py: SwitchTransformersTop1Router",
           k=1, capacity_rule="floor", capacity_factor=1.25, min_capacity=4,
           load_balancing="first_choice"),
    Preset("gshard", "mesh_tensorflow/transformer/moe.py: _top_2_gating",
           k=2, normalize=None, capacity_rule="floor", capacity_factor=1.25, min_capacity=4,
           load_balancing="first_choice", second_expert_policy="random", seed=0),
    Preset("flaxformer", "flaxformer/architectures/moe/routing.py: TokensChooseMaskedRouter; "
           "moe_layers.py: MoeLayer; t5x/configs/moe/models/tokens_choose_base.gin",
           priority="score", capacity_rule="round", capacity_factor=1.25, min_capacity=4,
           load_balancing="k_scaled"),
    Preset("deepspeed-top1", "deepspeed/moe/sharded_moe.py: top1gating (use_rts=True)",
           k=1, priority="random", min_capacity=4, load_balancing="first_choice", seed=0),
    Preset("deepspeed-top2", "deepspeed/moe/sharded_moe.py: top2gating "
           "(top2_2nd_expert_sampling=False)",
           k=2, renormalize_after_drop=True, min_capacity=4, load_balancing="first_choice"),
    Preset("deepspeed-topk", "deepspeed/moe/sharded_moe.py: topkgating (drop_policy='probs')",
           renormalize_after_drop=True, priority="token", drop_policy="probs", min_capacity=4),
    Preset("tutel", "tutel/impls/fast_dispatch.py: extract_critical; tutel/impls/losses.py: "
           "gshard_loss", normalize=None, capacity_rule="tutel", load_balancing="first_choice"),
    Preset("megablocks", "megablocks/layers/router.py: LearnedRouter; megablocks/layers/moe.py: "
           "ParallelMLP.expert_capacity, indices_and_bins, load_balancing_loss",
           priority="token", capacity_rule="k_floor"),
    Preset("megatron", "megatron/core/transformer/moe/router.py: TopKRouter; moe_utils.py: "
           "topk_routing_with_score_function, apply_router_token_dropping, "
           "switch_load_balancing_loss_func", normalize=None, priority="token",
           drop_policy="probs", capacity_factor=None, padding="routed"),
    Preset("mixtral", f"{HF}/mixtral/modeling_mixtral.py: MixtralTopKRouter, "
           "load_balancing_loss_func", normalize=True, priority="token", capacity_factor=None,
           load_balancing="k_scaled"),
    Preset("qwen2-moe", f"{HF}/qwen2_moe/modeling_qwen2_moe.py: Qwen2MoeTopKRouter, "
           "Qwen2MoeSparseMoeBlock", priority="token", capacity_factor=None,
           load_balancing="k_scaled", num_shared_experts=1, shared_expert_gate=True),
    Preset("qwen3-moe", f"{HF}/qwen3_moe/modeling_qwen3_moe.py: Qwen3MoeTopKRouter",
           normalize=True, priority="token", capacity_factor=None, load_balancing="k_scaled"),
    Preset("deepseek-v3", f"{HF}/deepseek_v3/modeling_deepseek_v3.py: DeepseekV3TopkRouter; "
           "megatron/core/transformer/moe/moe_utils.py: group_limited_topk",
           score="sigmoid", normalize=True, num_groups=8, topk_groups=4, group_score_k=2,
           scaling_factor=2.5, priority="token", capacity_factor=None, num_shared_experts=1),
    Preset("gpt-oss", f"{HF}/gpt_oss/modeling_gpt_oss.py: GptOssTopKRouter",
           normalize=True, priority="token", capacity_factor=None, load_balancing="k_scaled"),
    Preset("olmoe", f"{HF}/olmoe/modeling_olmoe.py: OlmoeTopKRouter", priority="token",
           capacity_factor=None, load_balancing="k_scaled"),
    Preset("nllb-moe", f"{HF}/nllb_moe/modeling_nllb_moe.py: NllbMoeTop2Router",
           k=2, renormalize_after_drop=True, capacity_rule="tutel", load_balancing="k_scaled",
           padding="counted"),
    # The routing conventions of HF transformers' MoE families that the presets above do not
    # cover (pymoe.hf.families() says which family routes by which); gated SwiGLU experts.
    Preset("qwen3-next", f"{HF}/qwen3_next/modeling_qwen3_next.py: Qwen3NextTopKRouter, "
           "Qwen3NextSparseMoeBlock", normalize=True, priority="token", capacity_factor=None,
           load_balancing="k_scaled", num_shared_experts=1, shared_expert_gate=True,
           activation="swiglu"),
    Preset("glm4-moe", f"{HF}/glm4_moe/modeling_glm4_moe.py: Glm4MoeTopkRouter (the DeepSeek-V3 "
           "router with n_group = 1)", score="sigmoid", normalize=True, scaling_factor=1.0,
           priority="token", capacity_factor=None, num_shared_experts=1, activation="swiglu"),
    Preset("llama4", f"{HF}/llama4/modeling_llama4.py: Llama4Router, Llama4TextMoe",
           score="sigmoid", priority="token", capacity_factor=None, num_shared_experts=1,
           gate_input=True, activation="swiglu"),
    Preset("deepseek-v2", f"{HF}/deepseek_v2/modeling_deepseek_v2.py: DeepseekV2TopkRouter "
           "(topk_method='group_limited_greedy')", num_groups=8, topk_groups=3, group_score_k=1,
           scaling_factor=16.0, priority="token", capacity_factor=None, num_shared_experts=1,
           activation="swiglu"),
    Preset("ernie4.5", f"{HF}/ernie4_5_moe/modeling_ernie4_5_moe.py: Ernie4_5_MoeTopKRouter",
           normalize=True, priority="token", capacity_factor=None, load_balancing="k_scaled",
           num_shared_experts=1, activation="swiglu"),
    Preset("gemma4", f"{HF}/gemma4/modeling_gemma4.py: Gemma4TextRouter, Gemma4TextDecoderLayer "
           "(the MoE branch)", normalize=True, priority="token", capacity_factor=None,
           router_input_norm=True, expert_input_norm=True, gate_scale=True, post_norm=True,
           activation="geglu"),
    Preset("inkling", f"{HF}/inkling/modeling_inkling.py: InklingTopkRouter, InklingMoE",
           score="sigmoid", priority="token", capacity_factor=None, scaling_factor=8.0,
           num_shared_experts=2, shared_router_scored=True, activation="swiglu"),
    # DeepSeek-V4's full router: sqrt(softplus) scores, top-K of s + b without groups,
    # renormalised, times 1.5; its hash layers are the same layer with hash_table= (tid2eid)
    # and forward(x, token_ids=...); experts and the shared MLP clamped SwiGLU (limit 10).
    Preset("deepseek-v4", f"{HF}/deepseek_v4/modeling_deepseek_v4.py: DeepseekV4TopKRouter, "
           "DeepseekV4HashRouter, DeepseekV4SparseMoeBlock", score="sqrtsoftplus",
           normalize=True, scaling_factor=1.5, priority="token", capacity_factor=None,
           num_shared_experts=1, activation="swiglu_clamped"),
    # PhiMoE's SparseMixer: two sequential picks within 2 * router_jitter_noise (relative) of
    # the best, each gated by its own masked softmax; sampled with the Heun-3 factor in training
    # (MoELayer.forward(x, train=True)); HF's generic (mixtral) aux loss.
    Preset("phimoe", f"{HF}/phimoe/modeling_phimoe.py: sparsemixer, PhimoeTopKRouter, "
           "PhimoeMultiplier", k=2, selection="sparsemixer", sparsemixer_eps=0.01,
           priority="token", capacity_factor=None, load_balancing="k_scaled",
           activation="swiglu"),
    # Doge's DogeCDMoE: product keys (2 sqrt(E) key logits, HF's token-mixing view), softmax
    # over the top K of the pair sums, single-neuron silu experts (H = 1) and a dense SwiGLU
    # MLP always added; its own aux loss is the Switch loss on the pair sums.
    Preset("doge", f"{HF}/doge/modeling_doge.py: DogeCDMoE, load_balancing_loss_func",
           product_keys="doge", normalize=True, priority="token", capacity_factor=None,
           load_balancing="switch", activation="silu", num_shared_experts=1,
           shared_activation="swiglu"),
]}


def presets() -> list[str]:
    """The preset names, in the order docs/conventions.md lists them."""
    return list(_PRESETS)


def preset(name: str | Preset, /, **overrides: Any) -> Preset:
    """The conventions of one system, as a frozen Preset (print it to see every field).

    Args:
        name: one of presets() (switch, gshard, flaxformer, deepspeed-top1, deepspeed-top2,
            deepspeed-topk, tutel, megablocks, megatron, mixtral, qwen2-moe, qwen3-moe,
            deepseek-v3, gpt-oss, olmoe, nllb-moe, qwen3-next, glm4-moe, llama4, deepseek-v2,
            ernie4.5), or a Preset to derive from.
        overrides: conventions to change, e.g. preset("flaxformer", priority="choice") for a
            decoder; name="..." renames the result (for compare(), which tells presets apart by
            name).
    Returns:
        a Preset; each preset's `source` names the system's file and function it follows (the
        list below is built from the presets themselves).
    """
    if isinstance(name, Preset):
        base = name
    elif isinstance(name, str):
        if name not in _PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; expected one of "
                             f"{', '.join(presets())}")
        base = _PRESETS[name]
    else:
        raise TypeError(f"preset: expected a name (str) or a pymoe.Preset, got {type(name).__name__}")
    if not overrides:
        return base
    new_name = overrides.pop("name", base.name)
    if not isinstance(new_name, str) or not new_name:
        raise TypeError(f"name: expected a non-empty str, got {new_name!r}")
    k = overrides.pop("k", base.k)
    return Preset(new_name, base.source, k, **{**base.conventions, **overrides})


preset.__doc__ = (preset.__doc__ or "") + "\n    Sources:\n" + "".join(
    f"        {p.name}: {p.source}\n" for p in _PRESETS.values())


def k_mismatch(p: Preset, k: int) -> str:
    """The warning for routing at another K than the preset's gating function is written for."""
    return (f"preset {p.name!r} is a top-{p.k} gating function ({p.source.split(';')[0]}); "
            f"k={k} routes it in a way the system never does (pass k={p.k})")


_GROUP_FIELDS = ("num_groups", "topk_groups", "group_score_k")


def _preset_error(err: ValueError, p: Preset, filled: dict[str, Any],
                  arguments: dict[str, Any]) -> ValueError:
    """A check failed on a keyword the preset filled in, not the caller: say so, with E."""
    arg = str(err).split(":", 1)[0]
    if arg not in filled:
        return err
    related = _GROUP_FIELDS if arg in _GROUP_FIELDS else (arg,)
    sets = ", ".join(f"{n}={filled[n]!r}" for n in related if n in filled)
    if "num_experts" in arguments:
        experts = f" E = {arguments['num_experts']} experts"
    elif "router_logits" in arguments:
        experts = f" E = {np.shape(arguments['router_logits'])[-1]} experts"
    else:
        experts = " these arguments"
    return ValueError(f"preset: {p.name!r} sets {sets}, which does not fit{experts} ({err}); "
                      f"pass {arg}= to override it")


def accepts_preset(keywords: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator: let `func` (route, MoELayer.__init__) take preset=. The preset fills every
    parameter of func and every name in `keywords` (what func's **keywords take) that the caller
    did not pass (except those in `skip`, which mean something else there); keywords passed
    explicitly are kept as given."""
    def decorate(func: F) -> F:
        sig = inspect.signature(func)
        var = next(p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            chosen = kwargs.pop("preset", None)
            if chosen is None:
                return func(*args, **kwargs)
            p = preset(chosen)
            bound = sig.bind_partial(*args, **kwargs)  # exactly what the caller passed
            k = bound.arguments.get("k")
            if not isinstance(k, numbers.Integral) or isinstance(k, bool):
                return func(*args, **kwargs)  # func names the bad (or missing) k
            if p.k is not None and k != p.k:
                _checks.warn(k_mismatch(p, int(k)))
            extra = bound.arguments.setdefault(var, {})
            filled = {}
            for name, value in p.keywords(int(k)).items():
                if name in skip or name in bound.arguments or name in extra:
                    continue
                if name in sig.parameters:
                    bound.arguments[name] = filled[name] = value
                elif name in keywords:
                    extra[name] = filled[name] = value
            try:
                return func(*bound.args, **bound.kwargs)
            except ValueError as err:
                raise _preset_error(err, p, filled, bound.arguments) from None

        return wrapper  # type: ignore[return-value]

    return decorate
