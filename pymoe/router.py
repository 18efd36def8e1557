"""Steps 1-2 of routing: router logits and the softmax over experts.

Legend (shared by every module, the C core and the CUDA kernels):
    T tokens, D model dim, E experts, K choices per token, C expert capacity, H expert hidden dim.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks


def router_dtype(dtype: np.dtype | type) -> np.dtype:
    """The dtype the router computes in: the input's, promoted to at least float32.

    Mesh-TF, flaxformer and DeepSpeed cast the router to float32 because low-precision logits flip
    top-k choices (docs/conventions.md, section 1); float64 stays float64.
    """
    return np.result_type(dtype, np.float32)


ROUNDED_DTYPES = ("bfloat16", "float16")  # the formats round_to emulates
ROUTER_DTYPES = ("float32", "float64") + ROUNDED_DTYPES  # route(..., router_dtype=)

_BF16_NAN = np.uint32(0xFFFF0000)  # torch's CPU tensor cast writes every NaN as bf16 0xFFFF


def round_to(x: Any, dtype: str) -> np.ndarray:
    """float32 values rounded to bfloat16 or float16 and returned as float32: bit for bit what
    torch's `x.to(dtype).float()` gives on CPU.

    Round to nearest, ties to even; values past the format's largest finite number overflow to
    +-inf; subnormals of the format are kept (float16's below 2^-24 and bf16's below 2^-133 round
    to a signed zero); signed zeros keep their sign. NaNs come out as torch writes them: bf16
    0xFFFF (torch's vectorised tensor cast; the scalar c10::BFloat16 would write 0x7FC0), float16
    the quiet NaN with the input's sign and top 10 payload bits (NumPy keeps a signalling NaN
    signalling instead, so float16 does NumPy's cast and then quiets NaNs).

    Args:
        x: an array of float16, float32 or float64 values (float64 is rounded to float32 first:
           the same as torch's `x.float().to(dtype)`, which can differ from one direct rounding).
        dtype: "bfloat16" or "float16".
    Returns:
        `<float32>` array of x's shape (a fresh array).
    """
    dtype = _checks.choice("dtype", dtype, ROUNDED_DTYPES)
    a = _checks.float_array("x", x, finite=False)
    a32 = np.ascontiguousarray(a, dtype=np.float32)  # [...]
    u = a32.view(np.uint32)  # [...] the float32 bit patterns
    nan = np.isnan(a32)  # [...]
    if dtype == "bfloat16":
        lsb = (u >> 16) & np.uint32(1)  # [...] the last bit kept: ties go to where it is 0
        with np.errstate(over="ignore"):  # only NaN patterns can wrap, and they are replaced
            r = ((u + np.uint32(0x7FFF) + lsb) >> 16) << 16  # [...] rounded, low 16 bits 0
        out = np.where(nan, _BF16_NAN, r).astype(np.uint32)  # [...]
        return out.view(np.float32)
    with np.errstate(over="ignore"):  # overflow to inf is the intended result
        r = a32.astype(np.float16).astype(np.float32).view(np.uint32)  # [...] NumPy's RNE
    quiet = (u & np.uint32(0x807FE000)) | np.uint32(0x7FC00000)  # sign, quiet bit, 10 payload bits
    return np.where(nan, quiet, r).astype(np.uint32).view(np.float32)


def round_logits(logits: np.ndarray, router_dtype: str | None) -> np.ndarray:
    """The router logits `[T, E]` in the dtype route() computes the scores in.

    None: the logits' own dtype promoted to at least float32 (router.router_dtype); "float32",
    "float64": cast to it; "bfloat16", "float16": rounded to that format (round_to) and kept as
    float32, so the scores are computed in float32 from the rounded logits (what HF models do:
    bf16 router logits, `softmax(logits, dtype=torch.float)`).
    """
    if router_dtype is None or logits.dtype == router_dtype:
        return logits
    if router_dtype in ROUNDED_DTYPES:
        return round_to(logits, router_dtype)
    return logits.astype(router_dtype)


def jitter(x: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative router noise: x * U(1 - eps, 1 + eps), drawn per entry.

    Args:
        x: `[T, D]` the router's copy of the tokens (the experts never see the noise, as in
           flaxformer, DeepSpeed and Megatron; HF Mixtral also jitters the experts' input).
    Returns:
        noise `[T, D]`, the multipliers (kept for the backward pass).
    """
    return rng.uniform(1.0 - eps, 1.0 + eps, size=x.shape).astype(x.dtype, copy=False)


def router_logits(x: np.ndarray, w_router: np.ndarray, b_router: np.ndarray) -> np.ndarray:
    """Step 1: score every token against every expert.

    Args:
        x: `[T, D]` tokens (already in the router dtype, jittered or not).
        w_router: `[D, E]`, b_router: `[E]`.
    Returns:
        router_logits `[T, E]` = x @ w_router + b_router; row t ranks the experts for token t.
    """
    return x @ w_router + b_router  # [T, E]


def softcap(router_logits: np.ndarray, cap: float) -> np.ndarray:
    """Step 1b (laguna): soft-capped logits `[T, E]` = cap * tanh(router_logits / cap), which
    stay inside (-cap, cap) and keep their order; ~ the logits themselves while |l| << cap."""
    return np.tanh(router_logits / cap) * cap


def softcap_backward(dcapped: np.ndarray, capped: np.ndarray, cap: float) -> np.ndarray:
    """Backward of softcap: d router_logits `[T, E]` = dcapped * (1 - tanh^2), tanh = capped / cap."""
    t = capped / cap
    return dcapped * (1.0 - t * t)


def router_logits_backward(drouter_logits: np.ndarray, x: np.ndarray,
                           w_router: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of step 1. Returns (dx `[T, D]`, dw_router `[D, E]`, db_router `[E]`), fresh arrays."""
    dx = drouter_logits @ w_router.T  # [T, D]
    dw = x.T @ drouter_logits  # [D, E]
    db = drouter_logits.sum(axis=0)  # [E]
    return dx, dw, db


def softmax(router_logits: np.ndarray) -> np.ndarray:
    """Step 2: probabilities over experts, numerically stable.

    Args:
        router_logits: `[T, E]`.
    Returns:
        probs `[T, E]`; every row is positive and sums to 1. Subtracting the row maximum first
        keeps exp() from overflowing and does not change the result.
    """
    z = router_logits - router_logits.max(axis=-1, keepdims=True)  # [T, E], max entry 0
    e = np.exp(z)  # [T, E] in (0, 1]
    return e / e.sum(axis=-1, keepdims=True)  # [T, E]


def softmax_backward(dprobs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Backward of step 2: d router_logits `[T, E]` = p * (dp - sum_e dp * p)."""
    return probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))


def softmax_lse(router_logits: np.ndarray,
                out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """softmax(router_logits) `[T, E]` and logsumexp(router_logits) `[T]` from one exp pass.

    The same bits as the two functions (the same max, exponentials and row sums), computed in
    place (in `out` when given, `[T, E]`): route() needs both, and exp over [T, E] is the
    costliest step of routing in NumPy. Each row depends on its own logits only.
    """
    m = router_logits.max(axis=-1, keepdims=True)  # [T, 1]
    e = np.subtract(router_logits, m, out=out)  # [T, E], max entry 0
    np.exp(e, out=e)
    s = e.sum(axis=-1, keepdims=True)  # [T, 1]
    lse = m[:, 0] + np.log(s[:, 0])  # [T]
    e /= s
    return e, lse


def logsumexp(router_logits: np.ndarray) -> np.ndarray:
    """log sum_e exp(router_logits[t, e]) per token, `[T]`, computed stably (used by the z-loss)."""
    m = router_logits.max(axis=-1)  # [T]
    return m + np.log(np.exp(router_logits - m[:, None]).sum(axis=-1))  # [T]
