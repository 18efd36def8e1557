"""Router precision: what rounding the router logits to bfloat16 or float16 does to the routing.

A router whose logits are computed in a 16-bit format (x @ w_router in bf16, as most serving
engines and many training stacks run it) chooses other experts than a float32 router for the
tokens whose K-th and (K+1)-th scores are closer than the format's spacing (SGLang #33764: 5.3% of
tokens). Mesh-TF, flaxformer and DeepSpeed cast the router to float32 for this reason
(docs/conventions.md, section 1). This module makes the effect exact and measurable:

    round_to(x, "bfloat16")      float32 values rounded to bf16 (or fp16), kept as float32
                                 (router.round_to: the router step owns its dtype)
    route(..., router_dtype=)    routing of the logits rounded to that format, scores in float32
    flip_report(logits, k, dt)   which tokens and (token, expert) pairs change between float32 and dt

Legend: T tokens, E experts, K choices per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from .router import ROUNDED_DTYPES, ROUTER_DTYPES, round_logits, round_to
from .routing import route
from .variants.scores import selection_scores

__all__ = ["ROUNDED_DTYPES", "ROUTER_DTYPES", "FlipReport", "flip_report", "round_to",
           "round_logits", "top_k_margins"]

def top_k_margins(scores: np.ndarray, k: int) -> np.ndarray:
    """The gap between each token's K-th and (K+1)-th score, `[T]` (inf when K = E): how far the
    scores must move before the chosen set changes. Sorted with np.sort, so ties give 0."""
    T, E = scores.shape
    if k >= E:
        return np.full(T, np.inf)
    s = -np.sort(-scores.astype(np.float64), axis=-1)  # [T, E] best first
    return s[:, k - 1] - s[:, k]  # [T]


@dataclass(frozen=True, eq=False)
class FlipReport:
    """What routing the logits in `dtype` changes against float32 (flip_report).

    A token flips when its set of K chosen experts differs (a new order among the same experts
    is not a flip); a pair flips when the token chose that expert in one routing only.
    """
    dtype: str
    k: int
    flipped: np.ndarray  # <bool>[T] True where the token's expert set changed
    pairs_flipped: int  # (token, expert) pairs chosen under dtype and not under float32
    margins: np.ndarray  # <float64>[T] K-th minus (K+1)-th float32 selection score
    gained: np.ndarray  # <int64>[E] tokens that choose expert e under dtype only
    lost: np.ndarray  # <int64>[E] tokens that choose expert e under float32 only
    reference: Any  # the float32 Routing
    rounded: Any  # the Routing under dtype

    @property
    def tokens(self) -> int:
        return int(self.flipped.size)

    @property
    def tokens_flipped(self) -> int:
        return int(np.count_nonzero(self.flipped))

    @property
    def token_rate(self) -> float:
        """Share of tokens whose expert set changed (0.0 when T = 0)."""
        return self.tokens_flipped / self.tokens if self.tokens else 0.0

    @property
    def pair_rate(self) -> float:
        """Share of the T*K (token, expert) pairs that changed (0.0 when T = 0)."""
        n = self.tokens * self.k
        return self.pairs_flipped / n if n else 0.0

    def margin_quantiles(self, qs: tuple[float, ...] = (0.01, 0.1, 0.5, 0.9)) -> dict[float, float]:
        """Quantiles of the top-K margins of every token (empty when T = 0)."""
        if self.tokens == 0:
            return {}
        return {q: float(np.quantile(self.margins, q)) for q in qs}

    def __str__(self) -> str:
        T, E = self.tokens, self.gained.size
        lines = [f"float32 -> {self.dtype}, K = {self.k}: {self.tokens_flipped} of {T} tokens "
                 f"({self.token_rate:.2%}) and {self.pairs_flipped} of {T * self.k} (token, "
                 f"expert) pairs ({self.pair_rate:.2%}) change experts"]
        if T:
            qs = ", ".join(f"q{int(q * 100)} {v:.3g}" for q, v in self.margin_quantiles().items())
            lines.append(f"  top-K margins (K-th minus (K+1)-th score): {qs}")
            if self.tokens_flipped:
                fm = self.margins[self.flipped]
                lines.append(f"  flipped tokens' margins: max {fm.max():.3g}, median "
                             f"{np.median(fm):.3g}")
        net = self.gained - self.lost  # [E]
        moved = [e for e in range(E) if self.gained[e] or self.lost[e]]
        if moved:
            order = sorted(moved, key=lambda e: (-abs(int(net[e])), e))[:8]
            lines.append("  experts (gained/lost): " + ", ".join(
                f"e{e} +{self.gained[e]}/-{self.lost[e]}" for e in order)
                + (" ..." if len(moved) > 8 else ""))
        return "\n".join(lines)


def flip_report(logits: Any, k: int, dtype: str, **route_options: Any) -> FlipReport:
    """Route `logits` with router_dtype="float32" and with router_dtype=dtype and compare.

    Args:
        logits: `[T, E]` router logits (float32, or float64: rounded to float32 first).
        k: K choices per token.
        dtype: "bfloat16", "float16", "float32" (nothing flips) or "float64" (float32 is then the
            rounded side: float64 logits chosen in float64 against their float32 rounding).
        route_options: any other keyword of route() (capacity_factor, preset, expert_bias, ...);
            router_dtype is this function's to set.
    Returns:
        a FlipReport; margins are those of the float32 selection scores (the scores plus
        expert_bias when one is given, the plain scores otherwise).
    """
    dtype = _checks.choice("dtype", dtype, ROUTER_DTYPES)
    if "router_dtype" in route_options:
        raise TypeError("flip_report() sets router_dtype itself (float32 against dtype); "
                        "pass dtype instead")
    ref = route(logits, k, router_dtype="float32", **route_options)
    low = route(logits, k, router_dtype=dtype, **route_options)
    T, E = ref.probs.shape
    K = ref.k
    chosen_ref = np.zeros((T, E), dtype=bool)  # [T, E]
    chosen_low = np.zeros((T, E), dtype=bool)  # [T, E]
    np.put_along_axis(chosen_ref, ref.expert_index, True, axis=-1)
    np.put_along_axis(chosen_low, low.expert_index, True, axis=-1)
    gained_pairs = chosen_low & ~chosen_ref  # [T, E]
    lost_pairs = chosen_ref & ~chosen_low  # [T, E]
    ranked = ref.probs if ref.expert_bias is None else selection_scores(ref.probs, ref.expert_bias)
    return FlipReport(dtype=dtype, k=K, flipped=np.asarray(gained_pairs.any(axis=-1)),
                      pairs_flipped=int(np.count_nonzero(gained_pairs)),
                      margins=top_k_margins(np.asarray(ranked), K),
                      gained=gained_pairs.sum(axis=0).astype(np.int64),
                      lost=lost_pairs.sum(axis=0).astype(np.int64), reference=ref, rounded=low)
