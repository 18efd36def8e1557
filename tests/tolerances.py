"""How closely each compiled path must match the NumPy reference, and why. Stated once, used by
every backend's tests.

- Integers (expert_index, position, slot_owner, masks, counts): exactly equal.
- dispatch and combine: bitwise equal. They do the same products and sums in the same order as
  pymoe.indexed (y = 0 + w0*r0 + w1*r1 ..., rows scaled by their weight), and the C core is built
  with -ffp-contract=off, so no fused multiply-add changes a rounding.
- gate gradient: a dot product over D whose summation order differs from NumPy's einsum. The
  standard bound for a float dot product (Higham, Accuracy and Stability, eq. 3.5) is
  |computed - exact| <= gamma_D * sum_d |a_d * b_d| with gamma_D ~ D * eps; two such sums differ
  by at most twice that, which is the tolerance (per entry, nothing hand-tuned).
- Router probabilities computed by a kernel (expf/exp and a sequential sum) against NumPy's
  (its own vectorised exp and pairwise sums): each is within a few ulps of the exact value, so
  they agree to PROB_RTOL = 8 ulps of the dtype; gates are probabilities (or a ratio of them),
  so they get GATE_RTOL = twice that.
- Quantities downstream of the gate gradient (router gradients of a whole layer): relative error
  (norm-wise) <= 1e-5 in float32 and <= 1e-12 in float64, a few ulps amplified by the softmax
  backward and one matmul.
"""
from __future__ import annotations

import numpy as np

DOWNSTREAM_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
PROB_RTOL = {np.dtype(d): 8 * float(np.finfo(d).eps) for d in (np.float32, np.float64)}
GATE_RTOL = {d: 2 * v for d, v in PROB_RTOL.items()}


def assert_dot_close(got: np.ndarray, ref: np.ndarray, abs_dot: np.ndarray, D: int) -> None:
    """got and ref are dot products over D terms whose absolute terms sum to abs_dot."""
    eps = np.finfo(got.dtype).eps
    bound = 2 * D * eps * abs_dot.astype(np.float64)
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    assert np.all(diff <= bound), f"max excess {np.max(diff - bound)}"


def rel_norm_error(got: np.ndarray, ref: np.ndarray) -> float:
    scale = max(np.linalg.norm(ref), np.linalg.norm(got))
    return 0.0 if scale == 0 else float(np.linalg.norm(got - ref) / scale)
