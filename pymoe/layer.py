"""MoELayer: router + routing + experts + combine, with a hand-written backward pass."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from . import _checks, token_groups
from .backend import BACKEND_NAMES, Backend, get_backend
from .dense import (
    combine_dense,
    combine_dense_backward,
    dispatch_dense,
    dispatch_dense_backward,
    gate_grad_from_dense,
)
from .expert_forms import FormSpec, form_spec, hidden_width
from .experts import EXPERT_PARAMS, ExpertsCache, experts_backward, experts_forward
from .options import (
    EXPERT_KEYWORDS,
    ROUTE_KEYWORDS,
    ExpertOptions,
    RouteOptions,
    expert_bias_arg,
    expert_options,
    hash_selection,
    hash_table_arg,
    keywords_doc,
    route_options,
    split_keywords,
    token_ids_arg,
    token_mask_arg,
)
from .replay import forced_selection, record_selection, recording
from .router import (
    jitter,
    router_dtype,
    router_logits,
    router_logits_backward,
    softcap,
    softcap_backward,
)
from .routing import Routing, check_replay, route_backward, route_unchecked
from .topk import warn_k1_normalize
from .variants.input_norm import NormCache, rms_norm, rms_norm_backward
from .variants.joint_shared import JointCache, joint_gates, joint_gates_backward
from .variants.latent import NormCache as LatentNormCache
from .variants.latent import centred_norm, centred_norm_backward, scaled_norm, scaled_norm_backward
from .variants.noisy import noisy_load_loss, noisy_load_loss_backward, softplus, softplus_backward
from .variants.presets import Preset, accepts_preset
from .variants.product_keys import product_key_logits, product_key_logits_backward
from .variants.router_mlp import RouterMLPCache, router_mlp_backward, router_mlp_forward
from .variants.scores import sigmoid
from .variants.shared import SharedCache, shared_experts_backward, shared_experts_forward
from .variants.top_p import dynamic_loss, dynamic_loss_backward
from .variants.zero_experts import zero_experts_backward, zero_experts_forward

PARAM_NAMES = ("w_router", "b_router", *EXPERT_PARAMS)  # always present


@dataclass
class _ForwardCache:
    x_shape: tuple[int, ...]
    x_dtype: np.dtype
    x_router: np.ndarray  # [T, D] router's (jittered) copy of x, router dtype
    noise: np.ndarray | None  # [T, D] jitter multipliers, or None
    routing: Routing
    experts: ExpertsCache
    expert_out: np.ndarray  # [E, C, D]
    x2: np.ndarray | None = None  # [T, D] tokens in the layer dtype
    noisy: tuple | None = None  # (clean [T, E], eps [T, E], z [T, E], std [T, E]) for noisy_topk
    shared: SharedCache | None = None
    pre_norm: np.ndarray | None = None  # [T, D] the MoE output before post_norm, float32 or wider
    inv_rms: np.ndarray | None = None  # [T, 1] 1 / sqrt(mean(pre_norm^2) + eps)
    normed: np.ndarray | None = None  # [T, D] pre_norm * inv_rms in the layer dtype
    token_mask: np.ndarray | None = None  # <bool>[T] True = a real token, or None
    router_norm: NormCache | None = None  # router_input_norm
    expert_norm: NormCache | None = None  # expert_input_norm
    joint: JointCache | None = None  # shared_router_scored: the joint normalisation's state
    gate: np.ndarray | None = None  # [T, K] the gates combine used, when not routing.gate
    latent: _Latent | None = None  # latent_dim / expert_post_norm: their state
    router_mlp: RouterMLPCache | None = None  # router_mlp: the MLP router's state


@dataclass
class _Latent:
    """What the latent MoE and the post-expert norm keep for backward (variants.latent)."""
    x_in: np.ndarray | None = None  # [T, D] the layer's tokens (latent_dim)
    pre: np.ndarray | None = None  # [T, Dm] x @ w_latent_in, before latent_norm
    norm: LatentNormCache | None = None  # latent_norm's
    y_lat: np.ndarray | None = None  # [T, Dm] the combined expert output, before w_latent_out
    post: LatentNormCache | None = None  # expert_post_norm's, over [E, C, Dm]


@dataclass
class _GroupsForwardCache:
    """token_groups > 1: everything backward needs is in the per-group cache."""
    x_shape: tuple[int, ...]
    x_dtype: np.dtype
    groups: token_groups.GroupsCache



_Method = TypeVar("_Method", bound=Callable[..., Any])


def _between_blas_calls(method: _Method) -> _Method:
    """Run a MoELayer method inside its backend's between_blas_calls block: the layer's C steps
    (dispatch, epilogues, combine, ...) on one thread, the cores left to the BLAS threads of the
    matmuls around them."""
    @functools.wraps(method)
    def run(self: MoELayer, *args: Any, **kwargs: Any) -> Any:
        with self.backend.between_blas_calls():
            return method(self, *args, **kwargs)
    return run  # type: ignore[return-value]


class MoELayer:
    """A mixture-of-experts feed-forward layer: y = sum_j gate_j * expert_{e_j}(x) per token.

    Args:
        d_model: D; d_hidden: H; num_experts: E; k: K choices per token.
        capacity_factor: as for pymoe.route.
        expert_bias: `[E]` selection bias, a buffer, not a parameter: assign
            `layer.expert_bias = pymoe.update_expert_bias(layer.expert_bias, load, rate)`.
        hash_table: `<int>[V, K]` or None: hash routing (DeepSeek-V4's hash layers, HF
            `tid2eid`), a frozen buffer: forward(x, token_ids=ids) sends token t to the experts
            hash_table[ids[t]], gated by their normalised, scaled scores (route()'s hash_table).
        backend: who moves the routed data in the indexed formulation: "numpy", "c", or "auto"
            (C when it is built, else NumPy). The dense formulation is NumPy only.
        dtype: float16, float32 or float64 for parameters and expert math; the router always
            computes in at least float32.
        seed: initialises the parameters and the noise generator (random slot rules draw from
            it too).
        preset: a system's name (pymoe.presets()) or a pymoe.Preset supplying every routing
            keyword (and num_shared_experts, shared_expert_gate) not passed explicitly.
        keywords: every routing keyword of pymoe.route (pymoe.options.RouteOptions) and the
            layer's own (pymoe.options.ExpertOptions; listed below), checked there. Each one is
            also an attribute of the layer (layer.aux_loss_coef, layer.priority, ...).

    Attributes:
        params, grads: dicts keyed w_router `[D, E]`, b_router `[E]` (`[D, 2 sqrt(E)]`,
            `[2 sqrt(E)]` with product_keys), w1 `[E, D, W]`, b1 `[E, W]`,
            w2 `[E, H, D]`, b2 `[E, D]`, where W = 2H for a gated form (w1's columns: the gate
            ones, then the up ones; HF's gate_up_proj transposed) and H otherwise; with noisy
            top-K also w_noise `[D, E]`; with S shared experts shared_w1 `[S, D, Ws]`, shared_b1
            `[S, Ws]`, shared_w2 `[S, Hs, D]`, shared_b2 `[S, D]` (Hs = shared_d_hidden, Ws as W)
            and, gated, w_shared_gate `[D]`; with output_bias b_out `[D]`; with post_norm
            post_norm_weight `[D]`; with identity_experts / null_experts the expert weights hold
            the Er = E - Z - N real experts; with shared_router_scored w_router `[D, E + S]`,
            b_router `[E + S]` and global_scale `[1]`; with latent_dim w_latent_in `[D, Dm]`,
            w_latent_out `[Dm, D]` and the experts in Dm, latent_norm_weight and
            expert_post_norm_weight `[Dm or D]`; with router_mlp `[R]`-wide router weights
            (w_router_down `[D, R]`, ..., w_router `[R, E]`, router_state_scale `[R]`)
            (docs/variants.md). backward() overwrites grads (it does not accumulate).
        router_state, router_state_grad: with router_mlp, this forward's router state `[T, R]`
            for the next layer, and after backward the gradient of the state forward read.
        expert_form, shared_form: the routed and shared experts' FormSpec (name and arguments).
        routing, aux_loss, z_loss: from the last forward() (routing: a tuple of G Routings
            when token_groups > 1; aux_loss, z_loss: the mean over groups of each group's terms).
        load_loss: noisy top-K's CV(load)^2 of the last forward() (0 without it).
        dynamic_loss: top_p's router entropy of the last forward() (variants.top_p; 0 without
            top_p), weighted by dynamic_loss_coef in loss_terms().
        expert_bias: `[E]` selection bias or None (a buffer the training loop updates).
    """

    @accepts_preset(ROUTE_KEYWORDS + EXPERT_KEYWORDS, skip=("seed",))  # a preset's seed is
    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int,  # route()'s
                 capacity_factor: float | None = 1.25, *, expert_bias: np.ndarray | None = None,
                 hash_table: np.ndarray | None = None, backend: str = "auto",
                 dtype: np.dtype | type = np.float32, seed: int = 0,
                 preset: str | Preset | None = None, **keywords: Any) -> None:
        route_kw, expert_kw = split_keywords("MoELayer", keywords, RouteOptions, ExpertOptions)
        self.d_model = _checks.integer("d_model", d_model, low=1)
        self.d_hidden = _checks.integer("d_hidden", d_hidden, low=1)
        self.num_experts = _checks.integer("num_experts", num_experts, low=1)
        self.options = route_options(self.num_experts, k, capacity_factor, **route_kw)
        self.expert_bias = expert_bias_arg(expert_bias, self.num_experts)
        self.expert_options = expert_options(self.options, self.num_experts, **expert_kw)
        self.hash_table = self._checked_hash_table(hash_table)
        if dtype is None:  # np.dtype(None) is float64: a silent default nobody asked for
            raise TypeError("dtype: expected float16, float32 or float64, got None")
        try:
            self.dtype = np.dtype(dtype)
        except TypeError as err:
            raise TypeError(f"dtype: expected float16, float32 or float64, got {dtype!r}") from err
        if self.dtype.type not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, float32 or float64, got {self.dtype}")
        seed = _checks.integer("seed", seed, low=0)
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of 'auto', "
                             f"{', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
        if backend == "cuda":
            raise ValueError("backend: MoELayer computes on host (NumPy) arrays; for device "
                             "arrays use the CUDA kernels directly: pymoe.get_backend('cuda')")
        if self.formulation == "dense" and backend not in ("auto", "numpy"):
            raise ValueError(f"backend: the dense formulation runs in NumPy only, got {backend!r}; "
                             "use formulation='indexed' for compiled backends")
        if self.dtype == np.float16 and backend not in ("auto", "numpy"):
            raise ValueError(f"backend: {backend!r} takes float32 or float64; use backend='numpy' "
                             "(or 'auto') for a float16 layer")
        numpy_only = self.formulation == "dense" or self.dtype == np.float16
        self._backend_request = "numpy" if numpy_only else backend  # re-resolved on unpickling
        self.backend: Backend = get_backend(self._backend_request)
        warn_k1_normalize(self.options)

        D, H, E = self.d_model, self.d_hidden, self.num_experts
        Er = self.real_experts  # E without the zero-computation experts (they have no weights)
        W = hidden_width(self.activation, H)
        De = self.expert_width  # D, or the latent width
        rng = np.random.default_rng(seed)
        # Router: small init (std sqrt(0.1 / D), Switch Transformer sec. 2.4) so that early
        # routing is close to uniform; experts: fan-in scaled normal; all biases zero.
        Er_ = self._router_width() + (self.num_shared_experts if self.shared_router_scored else 0)
        Dr = D if self.router_mlp is None else self.router_mlp  # what w_router reads
        self.params: dict[str, np.ndarray] = {
            "w_router": rng.normal(0.0, np.sqrt(0.1 / Dr), (Dr, Er_)),
            "b_router": np.zeros(Er_),
            "w1": rng.normal(0.0, np.sqrt(1.0 / De), (Er, De, W)),
            "b1": np.zeros((Er, W)),
            "w2": rng.normal(0.0, np.sqrt(1.0 / H), (Er, H, De)),
            "b2": np.zeros((Er, De)),
        }
        if self.router_noise == "noisy_topk":
            self.params["w_noise"] = rng.normal(0.0, np.sqrt(0.1 / D), (D, E))
        S = self.num_shared_experts
        if S:
            Hs = self.shared_d_hidden or H
            Ws = hidden_width(self.shared_form, Hs)
            self.params.update({
                "shared_w1": rng.normal(0.0, np.sqrt(1.0 / D), (S, D, Ws)),
                "shared_b1": np.zeros((S, Ws)),
                "shared_w2": rng.normal(0.0, np.sqrt(1.0 / Hs), (S, Hs, D)),
                "shared_b2": np.zeros((S, D)),
            })
            if self.shared_expert_gate:
                self.params["w_shared_gate"] = rng.normal(0.0, np.sqrt(1.0 / D), D)
        if self.shared_router_scored:
            self.params["global_scale"] = np.ones(1)
        if self.router_mlp is not None:
            R = self.router_mlp
            self.params.update(
                w_router_down=rng.normal(0.0, np.sqrt(1.0 / D), (D, R)), b_router_down=np.zeros(R),
                router_norm_weight=np.ones(R),
                w_router_fc1=rng.normal(0.0, np.sqrt(1.0 / R), (R, R)), b_router_fc1=np.zeros(R),
                w_router_fc2=rng.normal(0.0, np.sqrt(1.0 / R), (R, R)), b_router_fc2=np.zeros(R))
            if self.router_state_input:
                self.params["router_state_scale"] = np.ones(R)
        if self.latent_dim is not None:
            self.params["w_latent_in"] = rng.normal(0.0, np.sqrt(1.0 / D), (D, De))
            self.params["w_latent_out"] = rng.normal(0.0, np.sqrt(1.0 / De), (De, D))
        if self.latent_norm:
            self.params["latent_norm_weight"] = np.zeros(De)
        if self.expert_post_norm:
            self.params["expert_post_norm_weight"] = np.zeros(De)
        if self.output_bias:
            self.params["b_out"] = np.zeros(D)
        if self.post_norm:
            self.params["post_norm_weight"] = np.ones(D)
        if self.router_input_norm:
            self.params["router_norm_scale"] = np.ones(D)
        if self.expert_input_norm:
            self.params["expert_norm_weight"] = np.ones(D)
        if self.gate_scale:
            self.params["gate_scale"] = np.ones(E)
        self.params = {n: p.astype(self.dtype) for n, p in self.params.items()}
        self.grads: dict[str, np.ndarray] = {n: np.zeros_like(p) for n, p in self.params.items()}
        self._noise_rng = np.random.default_rng([seed, 1])
        self._cache: _ForwardCache | _GroupsForwardCache | None = None
        self._workspace: dict[str, np.ndarray] = {}  # step buffers reused by the indexed path
        self.routing: Routing | tuple[Routing, ...] | None = None  # a tuple with token_groups
        self.router_state: np.ndarray | None = None  # router_mlp: [T, R] for the next layer
        self.router_state_grad: np.ndarray | None = None  # d previous layer's router_state
        self.aux_loss = 0.0
        self.z_loss = 0.0
        self.load_loss = 0.0
        self.dynamic_loss = 0.0  # top_p's router entropy (variants.top_p.dynamic_loss)

    @property
    def expert_width(self) -> int:
        """The width the routed experts read and write: latent_dim, else d_model."""
        return self.d_model if self.latent_dim is None else self.latent_dim

    @property
    def real_experts(self) -> int:
        """Er: the experts with parameters, E less the identity and null experts."""
        return self.num_experts - self.identity_experts - self.null_experts

    def _experts(self, expert_in: np.ndarray, p: dict[str, np.ndarray],
                 filled: np.ndarray | None) -> tuple[np.ndarray, ExpertsCache]:
        """Step 11b: expert_out `[E, C, D]` of expert_in `[E, C, D]` (filled: the indexed path's
        rows per expert, None for the dense formulation); the real experts run experts_forward,
        the zero-computation ones (variants.zero_experts) copy their input or give 0."""
        Er = self.real_experts
        indexed = filled is not None
        out, cache = experts_forward(
            expert_in[:Er], p["w1"], p["b1"], p["w2"], p["b2"], self.expert_form,
            filled=None if filled is None else filled[:Er],
            workspace=self._workspace if indexed else None,
            backend=self.backend if indexed else None)  # [Er, C, D]
        if Er == self.num_experts:
            return out, cache
        return zero_experts_forward(expert_in, out, self.identity_experts), cache

    def _experts_backward(self, d_out: np.ndarray, p: dict[str, np.ndarray],
                          cache: ExpertsCache, indexed: bool
                          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Backward of _experts: (d expert_in `[E, C, D]`, the real experts' gradients)."""
        Er = self.real_experts
        ws, be = (self._workspace, self.backend) if indexed else (None, None)
        if Er == self.num_experts:
            return experts_backward(d_out, p["w1"], p["w2"], cache, ws, be)
        d_real, grads = experts_backward(np.ascontiguousarray(d_out[:Er]), p["w1"], p["w2"],
                                         cache, ws, be)  # [Er, C, D]
        return zero_experts_backward(d_out, d_real, self.identity_experts), grads

    @property
    def expert_form(self) -> FormSpec:
        """The routed experts' form with its arguments (from activation, swiglu_limit, ...)."""
        o = self.expert_options
        return form_spec(o.activation, swiglu_limit=o.swiglu_limit, swiglu_alpha=o.swiglu_alpha,
                         swiglu_softcap=o.swiglu_softcap)

    @property
    def shared_form(self) -> FormSpec:
        """The shared experts' form: the routed one, with shared_swiglu_limit when given."""
        o = self.expert_options
        limit = o.swiglu_limit if o.shared_swiglu_limit is None else o.shared_swiglu_limit
        return form_spec(o.shared_activation or o.activation, swiglu_limit=limit, swiglu_alpha=o.swiglu_alpha,
                         swiglu_softcap=o.swiglu_softcap)

    def __getattr__(self, name: str) -> Any:
        """Every keyword reads as an attribute: layer.k, layer.priority, layer.aux_loss_coef."""
        for options, names in (("options", ROUTE_KEYWORDS), ("expert_options", EXPERT_KEYWORDS)):
            if name in names and options in self.__dict__:
                return getattr(self.__dict__[options], name)
        raise AttributeError(f"'MoELayer' object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        """The keywords are checked once, at construction, into layer.options and
        layer.expert_options, which forward() and backward() read: assigning one would be
        silently ignored, so it raises instead."""
        if name in ROUTE_KEYWORDS or name in EXPERT_KEYWORDS:
            which = "options" if name in ROUTE_KEYWORDS else "expert_options"
            raise AttributeError(
                f"{name}: a MoELayer's keywords are fixed at construction (checked once into "
                f"layer.{which}); build a new layer, or replace the options object: "
                f"layer.{which} = dataclasses.replace(layer.{which}, {name}=...)")
        super().__setattr__(name, value)

    # ---------------------------------------------------------------- pickling
    # A backend holds a compiled library (cffi objects do not pickle): the state keeps the name
    # it was asked for ("auto", "numpy", "c") and loading resolves it again on that machine.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["backend"]
        state.pop("_workspace", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._workspace = {}
        self.backend = get_backend(self._backend_request)

    # ---------------------------------------------------------------- checks
    def _checked_params(self) -> dict[str, np.ndarray]:
        """self.params after checking each entry (callers may replace them): a numpy array of
        the layer dtype and its documented shape; returned C-contiguous so that the matmuls see
        the same layout, and give the same bits, whatever the caller stored."""
        out = {}
        for name, shape in self._param_shapes().items():
            p = self.params.get(name)
            if not isinstance(p, np.ndarray):
                raise TypeError(f"params['{name}']: expected a numpy array, got "
                                f"{type(p).__name__}")
            if p.dtype != self.dtype:
                raise TypeError(f"params['{name}']: expected dtype {self.dtype} (the layer "
                                f"dtype, native byte order), got {p.dtype}")
            _checks.check_shape(f"params['{name}']", p, shape)
            out[name] = np.ascontiguousarray(p)
        return out

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's documented shape (the variants add w_noise and the shared experts)."""
        D, H, E, S = self.d_model, self.d_hidden, self.num_experts, self.num_shared_experts
        Er, De = self.real_experts, self.expert_width
        W = hidden_width(self.activation, H)
        R = self._router_width() + (S if self.shared_router_scored else 0)  # router columns
        Dr = D if self.router_mlp is None else self.router_mlp
        shapes = {"w_router": (Dr, R), "b_router": (R,), "w1": (Er, De, W), "b1": (Er, W),
                  "w2": (Er, H, De), "b2": (Er, De)}
        if self.router_noise == "noisy_topk":
            shapes["w_noise"] = (D, E)
        if S:
            Hs = self.shared_d_hidden or H
            Ws = hidden_width(self.shared_form, Hs)
            shapes.update(shared_w1=(S, D, Ws), shared_b1=(S, Ws), shared_w2=(S, Hs, D),
                          shared_b2=(S, D))
            if self.shared_expert_gate:
                shapes["w_shared_gate"] = (D,)
        if self.shared_router_scored:
            shapes["global_scale"] = (1,)
        if self.router_mlp is not None:
            Rm = self.router_mlp
            shapes.update(w_router_down=(D, Rm), b_router_down=(Rm,), router_norm_weight=(Rm,),
                          w_router_fc1=(Rm, Rm), b_router_fc1=(Rm,), w_router_fc2=(Rm, Rm),
                          b_router_fc2=(Rm,))
            if self.router_state_input:
                shapes["router_state_scale"] = (Rm,)
        if self.latent_dim is not None:
            shapes.update(w_latent_in=(D, De), w_latent_out=(De, D))
        if self.latent_norm:
            shapes["latent_norm_weight"] = (De,)
        if self.expert_post_norm:
            shapes["expert_post_norm_weight"] = (De,)
        if self.output_bias:
            shapes["b_out"] = (D,)
        if self.post_norm:
            shapes["post_norm_weight"] = (D,)
        if self.router_input_norm:
            shapes["router_norm_scale"] = (D,)
        if self.expert_input_norm:
            shapes["expert_norm_weight"] = (D,)
        if self.gate_scale:
            shapes["gate_scale"] = (E,)
        return shapes

    def _router_width(self) -> int:
        """R, the router's outputs: E, or 2 sqrt(E) key logits with product_keys."""
        if self.product_keys is None:
            return self.num_experts
        return 2 * int(round(self.num_experts ** 0.5))

    def _param_names(self) -> tuple[str, ...]:
        return tuple(self._param_shapes())

    def nonfinite_error(self, what: str, names: tuple[str, ...], inputs: str,
                        params: dict[str, np.ndarray] | None = None) -> ValueError:
        """The error for a non-finite intermediate: the parameter that holds a NaN/inf when one
        does, else an overflow of finite values, said in the caller's terms (the token-group step
        raises it too, with the parameters it computed with: an expert-parallel rank's own)."""
        for name in names:
            p = (self.params if params is None or name not in params else params)[name]
            bad = p.size - np.count_nonzero(np.isfinite(p))
            if bad:
                return ValueError(f"params['{name}']: expected finite values, got {bad} NaN/inf "
                                  f"entr{'y' if bad == 1 else 'ies'}")
        wider = "" if self.dtype == np.float64 else " or build the layer with dtype=np.float64"
        return ValueError(f"{inputs}: {what} overflowed to inf/NaN in {self.dtype} although "
                          f"{inputs} and every parameter are finite; scale {inputs} down{wider}")

    def _checked_hash_table(self, hash_table: object) -> np.ndarray | None:
        """hash_table checked (options.hash_table_arg) against what hash routing cannot join:
        a selection bias (nothing is ranked), token groups, expert choice."""
        table = hash_table_arg(hash_table, self.num_experts, self.options.k)
        if table is None:
            return None
        if self.expert_bias is not None:
            raise ValueError("expert_bias: hash routing chooses the experts by token id and "
                             "ranks nothing, so a selection bias would be ignored; leave it None")
        if self.token_groups > 1 or self.options.selection != "tokens":
            raise ValueError("hash_table: hash routing runs with token_groups = 1 and "
                             "selection='tokens' only")
        return table

    # ---------------------------------------------------------------- forward
    @_between_blas_calls
    def forward(self, x: np.ndarray, token_mask: np.ndarray | None = None, *,
                train: bool = False, replay: np.ndarray | None = None,
                token_types: np.ndarray | None = None,
                router_state: np.ndarray | None = None,
                token_ids: np.ndarray | None = None) -> np.ndarray:
        """y = MoE(x) for x `[T, D]` or `[..., D]` (flattened to tokens and restored).

        token_mask: `<bool>` of shape x.shape[:-1], True = a real token, False = padding (HF
        attention_mask), or None. Padding is in no statistic (aux_loss, z_loss, load_loss,
        routing.expert_load) and outside backward's objective (dx 0 there); with padding
        "absent" or "counted" it gets no slot and y = 0 there (shared experts and the output
        bias too), with "routed" it is routed and y is what the experts give
        (docs/variants.md, "Padding").
        router_state: `[T, R]` the previous layer's layer.router_state (router_mlp with
        router_state_input), or None: none added (Zaya's first layer).
        train=True applies router jitter when jitter_eps > 0, and SparseMixer's sampling
        (selection="sparsemixer": Gumbel picks and the Heun factor, drawn from the noise
        generator seeded by seed). replay: `<int>[T, K]` a selection
        to force (route()'s replay; T the flattened tokens), or None: then a pymoe.replay.Recorder
        replaying supplies one, and one recording stores this forward's expert_index. Returns y
        with x's shape, in the layer dtype. token_ids: `<int>` of shape x.shape[:-1], the
        tokens' ids, required by (and only by) a hash-routed layer (hash_table).
        token_types: `<int>` of shape x.shape[:-1], values in [0, modality_sets), the expert
        set each token routes among (modality_sets > 1; None: every token of type 0).
        """
        x = _checks.float_array("x", x, min_ndim=1)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape [..., {self.d_model}] (D = d_model), "
                             f"got {tuple(x.shape)}")
        train = _checks.boolean("train", train)
        mask = token_mask_arg(token_mask, x.shape[:-1])  # [T] or None
        p = self._checked_params()
        # C-contiguous in the layer dtype: the same values give the same bits whatever x's layout
        x2 = np.ascontiguousarray(x.reshape(-1, self.d_model), dtype=self.dtype)  # [T, D]
        table = self._checked_hash_table(self.hash_table)  # a buffer callers may replace
        hashed = hash_selection(table, token_ids_arg(token_ids, x.shape[:-1], table), replay)
        replay = forced_selection(self, replay) if hashed is None else hashed
        if self.token_groups > 1:
            if replay is not None or recording():
                raise ValueError("replay: router replay and recording run with token_groups = 1 "
                                 f"only, got token_groups = {self.token_groups}")
            return self._forward_groups(x, x2, train, mask)
        replay = check_replay(replay, x2.shape[0], self.options, self.num_experts)
        rnorm = enorm = None
        to_route = x2
        if self.router_input_norm:  # Gemma 4: RMSNorm(x) * scale * D^-1/2
            to_route, rnorm = rms_norm(x2, p["router_norm_scale"], self.input_norm_eps,
                                       self.d_model ** -0.5)  # [T, D]
        types = self._token_types(token_types, x.shape[:-1])  # [T] or None
        state = self._router_state_arg(router_state, x2.shape[0])
        x_router, noise, r, noisy, shared_logits, rmlp = self._route_noisy(
            to_route, train, mask, replay, types, state)
        if noise is not None and self.jitter_experts:  # HF Mixtral: x *= noise, in place
            x2 = (x2 * noise).astype(self.dtype, copy=False)  # [T, D] what the experts see
        if self.expert_input_norm:  # Gemma 4's pre_feedforward_layernorm_2
            x2, enorm = rms_norm(x2, p["expert_norm_weight"], self.input_norm_eps)  # [T, D]
        gin = self.gate_input
        lat = _Latent() if self.latent_dim is not None or self.expert_post_norm else None
        xe = x2 if lat is None else self._latent_in(x2, p, lat)  # [T, De] the experts' tokens
        # gate_input (Llama 4): the gate weighs the expert's input, the outputs add unweighted
        if self.formulation == "dense":
            w_in, w_out = ((r.combine_weights, r.dispatch_mask) if gin
                           else (r.dispatch_mask, r.combine_weights))
            expert_in = dispatch_dense(xe, w_in)  # [E, C, D]                          step 11
            out, ecache = self._experts(expert_in, p, None)  # [E, C, D]
            if lat is not None and self.expert_post_norm:
                out, lat.post = scaled_norm(out, p["expert_post_norm_weight"],
                                            self.expert_post_norm_eps)  # [E, C, De]
            y = combine_dense(out, w_out)  # [T, D]
        else:
            gate, gamma, joint = self._gates(r, p), None, None
            if shared_logits is not None:  # Inkling: K routed + S shared normalised together
                gate, gamma, joint = joint_gates(r.gate, sigmoid(shared_logits),
                                                 self.scaling_factor or 1.0,
                                                 float(p["global_scale"][0]))
                gate, gamma = gate.astype(self.dtype), gamma.astype(self.dtype)
            expert_in = self._dispatch(xe, r, gate if gin else None, "expert_in")  # [E, C, D]
            out, ecache = self._experts(expert_in, p, r.expert_load_kept)  # [E, C, D]
            if lat is not None and self.expert_post_norm:  # unfilled rows are 0 and stay 0
                out, lat.post = scaled_norm(out, p["expert_post_norm_weight"],
                                            self.expert_post_norm_eps)  # [E, C, De]
            y = self.backend.combine(out, r.expert_index, r.position,
                                     None if gin else gate)  # [T, D]
        if lat is not None and self.latent_dim is not None:  # back to the model width
            lat.y_lat = y
            y = y @ p["w_latent_out"]  # [T, D]
        shared = None
        if self.num_shared_experts:
            y_shared, shared = self.shared_forward(
                x2, p, None if self.formulation == "dense" else gamma)  # [T, D]
            wide = np.float32 if self.shared_sum_fp32 and self.dtype == np.float16 else None
            y = y + y_shared if wide is None else y.astype(wide) + y_shared.astype(wide)
            if self.shared_combine == "mean":
                y = y / 2
            y = y.astype(self.dtype, copy=False)  # [T, D]
        if self.output_bias:
            y = y + p["b_out"]
        pre_norm = inv_rms = normed = None
        if self.post_norm:  # axk1: RMSNorm in float32 (or wider), then the weight in the dtype
            pre_norm = y.astype(np.promote_types(self.dtype, np.float32))  # [T, D]
            inv_rms = 1.0 / np.sqrt((pre_norm * pre_norm).mean(axis=-1, keepdims=True)
                                    + self.post_norm_eps)  # [T, 1]
            normed = (pre_norm * inv_rms).astype(self.dtype)  # [T, D]
            y = p["post_norm_weight"] * normed
        if mask is not None and self.padding != "routed":
            y = np.where(mask[:, None], y, 0).astype(self.dtype, copy=False)  # [T, D]
        if not np.isfinite(y).all():  # [T, D]: one pass, versus the expert matmuls' T*K*D*H
            raise self.nonfinite_error("the expert outputs", self._param_names()[2:], "x")
        rows = slice(None) if mask is None else mask  # the load loss: real tokens only
        self.load_loss = (0.0 if noisy is None else
                          noisy_load_loss(noisy[0][rows], r.router_logits[rows], noisy[3][rows],
                                          self.k))
        self._cache = _ForwardCache(x.shape, x.dtype, x_router, noise, r, ecache, out, x2,
                                    noisy, shared, pre_norm, inv_rms, normed, mask, rnorm,
                                    enorm, None if self.formulation == "dense" else joint,
                                    None if self.formulation == "dense" else gate, lat, rmlp)
        self.router_state = None if rmlp is None else rmlp.h  # [T, R] for the next layer
        self.routing, self.aux_loss, self.z_loss = r, r.aux_loss, r.z_loss
        self.dynamic_loss = 0.0 if self.top_p is None else dynamic_loss(r.probs[rows])
        record_selection(self, r.expert_index)
        return y.reshape(x.shape)

    __call__ = forward

    def _gates(self, r: Routing, p: dict[str, np.ndarray]) -> np.ndarray:
        """The gates `[T, K]` the experts' outputs are weighed by, in the layer dtype: the
        routing's, times gate_scale[e] with that keyword (Gemma 4's per_expert_scale)."""
        gate = r.gate.astype(self.dtype)
        if self.gate_scale:
            gate = gate * p["gate_scale"][r.expert_index]  # [T, K]
        return gate

    # ------------------------------------------------------- latent MoE (variants.latent)
    def _latent_in(self, x2: np.ndarray, p: dict[str, np.ndarray], lat: _Latent) -> np.ndarray:
        """The experts' tokens `[T, De]`: x2 `[T, D]` projected to the latent width and
        normalised (latent_dim, latent_norm), or x2 itself (expert_post_norm alone)."""
        if self.latent_dim is None:
            return x2
        lat.x_in = x2
        lat.pre = x2 @ p["w_latent_in"]  # [T, Dm]
        if not self.latent_norm:
            return lat.pre
        xe, lat.norm = centred_norm(lat.pre, p["latent_norm_weight"], self.latent_norm_eps)
        return np.ascontiguousarray(xe)

    def _latent_in_backward(self, dxe: np.ndarray, lat: _Latent, p: dict[str, np.ndarray],
                            grads: dict[str, np.ndarray]) -> np.ndarray:
        """dx2 `[T, D]` of _latent_in for d of its output dxe `[T, De]`; fills grads."""
        assert lat.x_in is not None
        if lat.norm is not None:
            dxe, grads["latent_norm_weight"] = centred_norm_backward(
                dxe, p["latent_norm_weight"], lat.norm)
        grads["w_latent_in"] = lat.x_in.T @ dxe  # [D, Dm]
        return dxe @ p["w_latent_in"].T

    def _post_norm_backward(self, d_out: np.ndarray, lat: _Latent | None,
                            p: dict[str, np.ndarray], grads: dict[str, np.ndarray],
                            filled: np.ndarray | None) -> np.ndarray:
        """d of the experts' raw outputs `[E, C, De]` from d of their normed ones (d_out); rows
        past filled[e] (the indexed path's empty slots) hold no token and count for nothing."""
        if lat is None or lat.post is None:
            return d_out
        if filled is not None:
            rows = np.arange(d_out.shape[1])[None, :] < filled[:, None]  # [E, C]
            d_out = np.where(rows[..., None], d_out, 0).astype(d_out.dtype, copy=False)
        d_raw, grads["expert_post_norm_weight"] = scaled_norm_backward(
            d_out, p["expert_post_norm_weight"], lat.post)
        return np.ascontiguousarray(d_raw)

    def _dispatch(self, x2: np.ndarray, r: Routing, weight: np.ndarray | None,
                  name: str) -> np.ndarray:
        """backend.dispatch; the C backend writes into a buffer kept between steps. Pairs per
        token are r.k (E under expert choice, not self.k)."""
        if self.backend.name != "c":
            return self.backend.dispatch(x2, r.slot_owner, r.k, weight)  # r.k: E for expert choice
        shape = (self.num_experts, r.capacity, x2.shape[1])
        buf = self._workspace.get(name)
        if buf is None or buf.shape != shape or buf.dtype != x2.dtype:
            buf = self._workspace[name] = np.empty(shape, x2.dtype)
        c_backend: Any = self.backend  # only the C backend's dispatch takes out=
        return c_backend.dispatch(x2, r.slot_owner, r.k, weight, out=buf)

    def route_tokens(self, x2: np.ndarray, train: bool, token_mask: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, Routing]:
        """Steps 1-10 and 12 for tokens x2 `[T, D]` (token_mask: a checked `<bool>[T]` or None)
        -> (x_router, jitter noise or None, routing); the token-group step (pymoe.token_groups)
        routes each group with it."""
        return self._route_noisy(x2, train, token_mask)[:3]

    def _token_types(self, token_types: object, shape: tuple[int, ...]) -> np.ndarray | None:
        """token_types: None or ints in [0, modality_sets) of the tokens' shape -> `<int64>[T]`
        (None when there is one set)."""
        M = self.modality_sets
        if token_types is None:
            return None if M == 1 else np.zeros(int(np.prod(shape, dtype=np.int64)), np.int64)
        if M == 1:
            raise ValueError("token_types: only with modality_sets > 1 (expert sets by type)")
        a = np.asarray(token_types)
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"token_types: expected an integer array, got dtype {a.dtype}")
        if a.shape != tuple(shape):
            raise ValueError(f"token_types: expected shape {tuple(shape)}, got {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= M):
            raise ValueError(f"token_types: values must lie in [0, {M}), got {a.min()}..{a.max()}")
        return a.reshape(-1).astype(np.int64)

    def _router_state_arg(self, state: object, T: int) -> np.ndarray | None:
        """router_state: None, or `[T, R]` floats with router_state_input."""
        if state is None:
            return None
        if not self.router_state_input:
            raise ValueError("router_state: this layer reads no router state (router_mlp with "
                             "router_state_input=True does)")
        return _checks.float_array("router_state", state, shape=(T, self.router_mlp))

    def _route_noisy(self, x2: np.ndarray, train: bool, token_mask: np.ndarray | None = None,
                     replay: np.ndarray | None = None, token_types: np.ndarray | None = None,
                     router_state: np.ndarray | None = None):
        """route_tokens plus the noisy top-K state (clean logits, eps, z, std), or None without it,
        and the shared experts' logits `[T, S]` with shared_router_scored (else None); replay: a
        checked selection to force (routing.check_replay)."""
        p = self._checked_params()
        rdt = router_dtype(self.dtype)
        x_router = x2.astype(rdt)  # [T, D] the router's own copy
        noise = None
        if train and self.router_noise == "jitter":
            noise = jitter(x_router, self.jitter_eps, self._noise_rng)  # [T, D]
            x_router = x_router * noise
        rmlp = None
        if self.router_mlp is not None:  # Zaya: an MLP router (variants.router_mlp)
            logits, _, rmlp = router_mlp_forward(x_router, p, router_state, self.router_mlp_eps)
        else:
            logits = router_logits(x_router, p["w_router"].astype(rdt, copy=False),
                                   p["b_router"].astype(rdt, copy=False))  # [T, E]  step 1
        if self.product_keys is not None:  # [T, 2n] key logits -> [T, E] pair sums
            logits = product_key_logits(logits, self.product_keys)
        if not np.isfinite(logits).all():  # [T, E]: cheap, and NaN logits would route silently
            raise self.nonfinite_error("the router logits x @ w_router + b_router",
                                  ("w_router", "b_router"), "x")
        if self.logit_multiplier is not None:  # MuseSpark's output_multiplier
            logits = logits * rdt.type(self.logit_multiplier)  # [T, E]
        shared_logits = None
        if self.shared_router_scored:  # the last S columns score the shared experts
            E = self.num_experts
            logits, shared_logits = np.ascontiguousarray(logits[:, :E]), logits[:, E:]
        if self.router_softcap is not None:  # laguna: c tanh(l / c)                  step 1b
            logits = softcap(logits, self.router_softcap)  # [T, E]
        if token_types is not None:  # ernie4_5_vl_moe: each token's own expert set only
            sets = np.arange(self.num_experts) // (self.num_experts // self.modality_sets)  # [E]
            logits = np.where(sets[None, :] == token_types[:, None], logits, -np.inf)  # [T, E]
        noisy = None
        if self.router_noise == "noisy_topk":
            z = x_router @ p["w_noise"].astype(rdt, copy=False)  # [T, E]
            std = softplus(z)  # [T, E] learned noise scale
            eps = (self._noise_rng.standard_normal(logits.shape).astype(rdt) if train
                   else np.zeros_like(logits))  # [T, E]
            noisy = (logits, eps, z, std)
            logits = logits + eps * std  # [T, E] H: the noisy logits that are ranked
        bias = None if self.expert_bias is None else expert_bias_arg(self.expert_bias,
                                                                     self.num_experts)
        opts = self.options
        if train and opts.selection == "sparsemixer":  # PhiMoE training: Gumbel picks, Heun-3
            opts = dataclasses.replace(opts, sparsemixer_sampling=True)
        r = route_unchecked(logits, opts, expert_bias=bias, rng=self._noise_rng,
                            backend=self.backend, replay=replay,
                            token_mask=token_mask)  # steps 2-10, 12
        return x_router, noise, r, noisy, shared_logits, rmlp

    def _forward_groups(self, x: np.ndarray, x2: np.ndarray, train: bool,
                        mask: np.ndarray | None = None) -> np.ndarray:
        G, T = self.token_groups, x2.shape[0]
        if T == 0 or T % G:
            raise ValueError(f"x: token_groups={G} needs a number of tokens that is a positive "
                             f"multiple of {G}, got T = {T}")
        ex = token_groups.LocalExchange(G)
        masks = None if mask is None else np.split(mask, G)  # the mask is split like x
        ys, gc, aux, z = token_groups.forward_groups(self, np.split(x2, G), self._expert_params(), ex,
                                                self.load_stats, train, {}, masks)
        self._cache = _GroupsForwardCache(x.shape, x.dtype, gc)
        self.routing = tuple(s.routing for s in gc.groups)
        self.aux_loss, self.z_loss = aux, z
        return np.concatenate(ys).reshape(x.shape)  # (forward_groups checked y is finite)

    def _expert_params(self) -> dict[str, np.ndarray]:
        return {n: self.params[n] for n in EXPERT_PARAMS}

    # ------------------------------------------------------- shared experts
    # The one place that calls variants.shared (the layer, its token groups, expert parallelism).
    def shared_params(self) -> dict[str, np.ndarray]:
        """The shared experts' parameters (shared_w1, ..., w_shared_gate), {} without them."""
        names = [n for n in self._param_shapes() if n.startswith("shared_") or n == "w_shared_gate"]
        return {n: self.params[n] for n in names}

    def shared_forward(self, x2: np.ndarray, params: dict[str, np.ndarray],
                       weights: np.ndarray | None = None) -> tuple[np.ndarray, SharedCache]:
        """y_shared `[T, D]` of tokens x2 `[T, D]` and its cache (variants.shared); weights
        `[T, S]`: each shared expert's weight per token (shared_router_scored's gammas)."""
        return shared_experts_forward(x2, params, self.shared_form, self.shared_expert_gate,
                                      weights, self._shared_backend())

    def shared_backward(self, dy2: np.ndarray, x2: np.ndarray, params: dict[str, np.ndarray],
                        cache: SharedCache) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(dx `[T, D]`, the shared parameters' gradients) of shared_forward."""
        return shared_experts_backward(dy2, x2, params, cache, self._shared_backend())

    def _shared_backend(self) -> Backend | None:
        """The C backend runs the shared experts on its epilogues; NumPy keeps the reference."""
        return self.backend if self.backend.name == "c" else None

    def loss_terms(self) -> float:
        """aux_loss_coef * aux_loss + z_loss_coef * z_loss (+ load_loss_coef * load_loss with
        noisy top-K) of the last forward()."""
        return (self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss
                + self.load_loss_coef * self.load_loss
                + self.dynamic_loss_coef * self.dynamic_loss)

    # --------------------------------------------------------------- backward
    @_between_blas_calls
    def backward(self, dy: np.ndarray, *, router_dlogits: np.ndarray | None = None,
                 d_router_state: np.ndarray | None = None) -> np.ndarray:
        """Differentiate sum(y * dy) + loss_terms().

        Args:
            dy: gradient with respect to the last forward's y, same shape.
            router_dlogits: `[T, E]` or None: a further d objective / d self.routing.router_logits
                from a loss computed outside the layer, e.g. GlobalLoadBalance.loss_backward(
                layer.routing, coef); added to the router's own before w_router and dx (not with
                token_groups, whose routing is per group).
            d_router_state: `[T, R]` or None: d objective / d layer.router_state from the next
                layer (its router_state_grad); the gradient of the state this forward read is
                left in layer.router_state_grad.
        Returns:
            dx with the shape and dtype of the last forward's x. Fills self.grads (overwriting).
        """
        c = self._cache
        if c is None:
            raise ValueError("backward: called before forward(); there is no forward pass to "
                             "differentiate")
        dy = _checks.float_array("dy", dy, shape=c.x_shape)
        p = self._checked_params()
        dy2 = np.ascontiguousarray(dy.reshape(-1, self.d_model), dtype=self.dtype)  # [T, D]
        mask = c.groups.token_mask if isinstance(c, _GroupsForwardCache) else c.token_mask
        if mask is not None:  # padding rows are outside the objective
            dy2 = np.where(mask[:, None], dy2, 0).astype(self.dtype, copy=False)
        if isinstance(c, _GroupsForwardCache):
            if router_dlogits is not None:
                raise ValueError("router_dlogits: not supported with token_groups (each group "
                                 "routes on its own)")
            G = self.token_groups
            dxs, grads = token_groups.backward_groups(self, c.groups, np.split(dy2, G),
                                                 self._expert_params(), {})
            self.grads = {n: grads[n] for n in self.params}
            return np.concatenate(dxs).reshape(c.x_shape).astype(c.x_dtype, copy=False)
        r = c.routing
        extra: dict[str, np.ndarray] = {}
        if c.pre_norm is not None:  # n = pre * inv_rms, y = w * n
            assert c.inv_rms is not None and c.normed is not None
            extra["post_norm_weight"] = (dy2 * c.normed).sum(axis=0)  # [D]
            dn = (dy2 * p["post_norm_weight"]).astype(c.pre_norm.dtype)  # [T, D]
            mean_dn_pre = (dn * c.pre_norm).mean(axis=-1, keepdims=True)  # [T, 1]
            dy2 = (c.inv_rms * (dn - c.pre_norm * (c.inv_rms * c.inv_rms) * mean_dn_pre)
                   ).astype(self.dtype)  # [T, D] d/d(MoE output before the norm)
        if self.output_bias:
            extra["b_out"] = dy2.sum(axis=0)  # [D]
        if c.shared is not None and self.shared_combine == "mean":
            dy2 = dy2 / 2  # both terms of (routed + shared) / 2
        lat, dyr = c.latent, dy2  # dyr: d of the combined routed output, [T, De]
        if lat is not None and lat.y_lat is not None:  # y = y_lat @ w_latent_out
            extra["w_latent_out"] = lat.y_lat.T @ dy2  # [De, D]
            dyr = dy2 @ p["w_latent_out"].T  # [T, De]
        if self.gate_input:  # y = sum_j FFN_e(g_j x): the adjoints trade places, dgate = <x, d_in>
            if self.formulation == "dense":
                d_out, _ = combine_dense_backward(dy2, c.expert_out, r.dispatch_mask)
                d_in, eg = self._experts_backward(d_out, p, c.experts, False)  # [E, C, D]
                dx2 = dispatch_dense_backward(d_in, r.combine_weights)  # [T, D]
                d_cw = np.einsum("td,ecd->tec", x2_of(c), d_in, optimize=True)  # [T, E, C]
                dgate = gate_grad_from_dense(d_cw, r.expert_index, r.position)  # [T, K]
            else:
                gate = r.gate.astype(self.dtype)
                d_out = self._dispatch(dy2, r, None, "d_out")  # [E, C, D]
                d_in, eg = self._experts_backward(d_out, p, c.experts, True)  # [E, C, D]
                dgate = self.backend.gate_grad(x2_of(c), d_in, r.expert_index, r.position)
                dx2 = self.backend.combine(d_in, r.expert_index, r.position, gate)  # [T, D]
        elif self.formulation == "dense":
            d_out, d_cw = combine_dense_backward(dyr, c.expert_out, r.combine_weights)
            dgate = gate_grad_from_dense(d_cw, r.expert_index, r.position)  # [T, K]
            d_out = self._post_norm_backward(d_out, lat, p, extra, None)
            d_in, eg = self._experts_backward(d_out, p, c.experts, False)  # [E, C, D]
            dx2 = dispatch_dense_backward(d_in, r.dispatch_mask)  # [T, D]
        else:
            gate = (r.gate if c.gate is None else c.gate).astype(self.dtype)
            d_out = self._dispatch(dyr, r, gate, "d_out")  # [E, C, D]
            dgate = self.backend.gate_grad(dyr, c.expert_out, r.expert_index, r.position)
            d_out = self._post_norm_backward(d_out, lat, p, extra, r.expert_load_kept)
            d_in, eg = self._experts_backward(d_out, p, c.experts, True)  # [E, C, D]
            dx2 = self.backend.combine(d_in, r.expert_index, r.position)  # [T, D]
        if lat is not None and lat.x_in is not None:  # dx2 so far: d of the experts' tokens
            dx2 = self._latent_in_backward(dx2, lat, p, extra)  # [T, D]
        grads = dict(eg, **extra)
        if c.shared is not None and c.x2 is not None:  # forward keeps x2 with shared experts
            dx_shared, sg = self.shared_backward(dy2, c.x2, p, c.shared)
            dx2 = dx2 + dx_shared
            grads.update(sg)
        if c.expert_norm is not None:  # dx2 so far is d/d(the experts' normed input)
            dx2, grads["expert_norm_weight"] = rms_norm_backward(dx2, c.expert_norm)
        d_shared_logits = None
        if c.joint is not None:  # back through the joint normalisation and the shared sigmoid
            dgate, d_scores, d_global = joint_gates_backward(dgate, grads.pop("shared_weights"),
                                                             c.joint)
            s = c.joint.shared
            d_shared_logits = d_scores * s * (1.0 - s)  # [T, S]
            grads["global_scale"] = np.array([d_global])
        if not np.isfinite(dgate).all():  # said in the caller's terms, not route_backward's
            raise self.nonfinite_error("the gate gradient <dy, expert output>", (), "dy")
        if self.gate_scale:  # g' = g * s[e]: ds_e = sum of dg' * g over e's pairs
            grads["gate_scale"] = np.bincount(
                r.expert_index.ravel(), weights=(dgate * r.gate).ravel(),
                minlength=self.num_experts).astype(self.dtype)  # [E]
            dgate = dgate * p["gate_scale"][r.expert_index]  # [T, K]
        dlogits = route_backward(r, dgate, self.aux_loss_coef, self.z_loss_coef)  # [T, E]
        if self.dynamic_loss_coef:  # top_p's entropy term, over the real tokens
            rows = slice(None) if mask is None else mask
            dlogits[rows] += dynamic_loss_backward(r.probs[rows], self.dynamic_loss_coef)
        if router_dlogits is not None:
            dlogits = dlogits + _checks.float_array("router_dlogits", router_dlogits,
                                                    shape=dlogits.shape).astype(dlogits.dtype)
        if self.router_softcap is not None:  # r.router_logits are the capped logits
            dlogits = softcap_backward(dlogits, r.router_logits, self.router_softcap)
        if d_shared_logits is not None:  # the router's last S columns
            dlogits = np.concatenate([dlogits, d_shared_logits.astype(dlogits.dtype)], axis=1)
        rdt = router_dtype(self.dtype)
        dx_router = None
        if c.noisy is not None:  # H = clean + eps * softplus(z), z = x_router @ w_noise
            clean, eps, z, std = c.noisy
            if mask is None:
                dclean, dnoisy, dstd = noisy_load_loss_backward(clean, r.router_logits, std,
                                                                self.k, self.load_loss_coef)
            else:  # the load loss of the real tokens
                dclean, dnoisy, dstd = (np.zeros_like(clean) for _ in range(3))
                dclean[mask], dnoisy[mask], dstd[mask] = noisy_load_loss_backward(
                    clean[mask], r.router_logits[mask], std[mask], self.k, self.load_loss_coef)
            dH = dlogits + dnoisy
            dz = softplus_backward(eps * dH + dstd, z)  # [T, E]
            grads["w_noise"] = c.x_router.T @ dz  # [D, E]
            dx_router = dz @ p["w_noise"].astype(rdt, copy=False).T  # [T, D]
            dlogits = dH + dclean
        if self.logit_multiplier is not None:
            dlogits = dlogits * rdt.type(self.logit_multiplier)
        if self.product_keys is not None:  # [T, E] -> [T, 2n]
            dlogits = product_key_logits_backward(dlogits, self.product_keys)
        if c.router_mlp is not None:
            if d_router_state is not None:
                d_router_state = _checks.float_array("d_router_state", d_router_state,
                                                     shape=c.router_mlp.h.shape)
            dxr, rg, self.router_state_grad = router_mlp_backward(dlogits, c.router_mlp, p,
                                                                  d_router_state)
            grads.update(rg)
            dw_router, db_router = rg["w_router"], rg["b_router"]
        else:
            if d_router_state is not None:
                raise ValueError("d_router_state: this layer has no MLP router, so no router "
                                 "state to differentiate")
            dxr, dw_router, db_router = router_logits_backward(
                dlogits, c.x_router, p["w_router"].astype(rdt, copy=False))
        dx_router = dxr if dx_router is None else dx_router + dxr
        if c.noise is not None and not self.jitter_experts:
            dx_router *= c.noise
        if c.router_norm is not None:  # the router read RMSNorm(x) * scale * D^-1/2
            dx_router, grads["router_norm_scale"] = rms_norm_backward(
                dx_router.astype(self.dtype, copy=False), c.router_norm, self.d_model ** -0.5)
        dx2 += dx_router.astype(self.dtype, copy=False)  # dx2 is this step's own array
        if c.noise is not None and self.jitter_experts:  # every path read x * noise
            dx2 = dx2 * c.noise.astype(self.dtype, copy=False)
        grads.update({"w_router": dw_router, "b_router": db_router})
        for name in self.params:
            if not np.isfinite(grads[name]).all():
                raise self.nonfinite_error(f"the gradient of params['{name}']", (), "dy")
        if not np.isfinite(dx2).all():
            raise self.nonfinite_error("the gradient dx", (), "dy")
        self.grads = {n: grads[n].astype(self.dtype, copy=False) for n in self.params}
        return dx2.reshape(c.x_shape).astype(c.x_dtype, copy=False)


def x2_of(c: _ForwardCache) -> np.ndarray:
    """The forward's tokens `[T, D]` in the layer dtype (kept when a backward needs them)."""
    assert c.x2 is not None
    return c.x2


MoELayer.__doc__ = (MoELayer.__doc__ or "") + (
    "\n    Keywords of the layer (pymoe.options.ExpertOptions):\n" + keywords_doc(ExpertOptions))
