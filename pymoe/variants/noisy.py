"""Noisy top-K gating (Shazeer et al. 2017, arXiv:1701.06538, sec. 2.1 and appendix A).

The router adds learned, per-token Gaussian noise to its logits before the top-K:
    H = clean + eps * softplus(x @ w_noise),   eps ~ N(0, 1) (training only),
and balances the experts with a smooth estimate of how many tokens each would receive:
    P[t, e] = Phi((clean[t, e] - threshold[t, e]) / std[t, e]),  load_e = sum_t P[t, e],
the probability that expert e stays in token t's top-K when only its own noise is redrawn.
threshold[t, e] is the K-th largest noisy logit of the row among the *other* experts: the
(K+1)-th largest of the row if e is in the top-K, else the K-th. The loss is CV(load)^2. Unlike
the counts f_e of the Switch loss, this is differentiable, including through the thresholds.
"""
from __future__ import annotations

import math

import numpy as np

from ..topk import top_k

_erf = np.frompyfunc(math.erf, 1, 1)
_CV_EPS = 1e-10  # keeps CV^2 finite if every load underflows to 0


def softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + exp(z)) `[T, E]`, computed without overflow; always > 0 (the noise scale)."""
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def softplus_backward(dstd: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Backward of softplus: dz = dstd * sigmoid(z)."""
    return dstd / (1.0 + np.exp(-z))


def normal_cdf(z: np.ndarray) -> np.ndarray:
    """Phi(z), the standard normal CDF, elementwise (float64)."""
    erf = np.asarray(_erf(np.asarray(z, np.float64) / math.sqrt(2.0)), np.float64)
    return 0.5 * (1.0 + erf)


def normal_pdf(z: np.ndarray) -> np.ndarray:
    """phi(z) = exp(-z^2 / 2) / sqrt(2 pi), elementwise."""
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def noise_thresholds(noisy: np.ndarray, k: int) -> np.ndarray:
    """For every (t, e), the column of the row's K-th best noisy logit among the other experts.

    Args:
        noisy: `[T, E]` noisy logits H, with K < E.
    Returns:
        `<int64>[T, E]`: the expert whose H is e's threshold: the (K+1)-th ranked expert if e is
        in the top-K, else the K-th ranked (ranks as top_k: ties to the lower expert).
    """
    ranked = top_k(noisy, k + 1)  # [T, K+1]
    T, E = noisy.shape
    in_top = np.zeros((T, E), dtype=bool)
    np.put_along_axis(in_top, ranked[:, :k], True, axis=-1)
    return np.where(in_top, ranked[:, k:k + 1], ranked[:, k - 1:k])  # [T, E]


def smooth_load(clean: np.ndarray, noisy: np.ndarray, std: np.ndarray, k: int) -> np.ndarray:
    """load `[E]` = sum_t Phi((clean - threshold) / std), the expected top-K count per expert."""
    thr = np.take_along_axis(noisy, noise_thresholds(noisy, k), axis=-1)  # [T, E]
    return normal_cdf((clean - thr) / std).sum(axis=0)  # [E]


def cv_squared(v: np.ndarray) -> float:
    """The squared coefficient of variation var(v) / mean(v)^2 (population variance; 0 when
    every entry is equal). Shazeer et al. weight it by w_load."""
    m = float(v.mean())
    return float(v.var() / (m * m + _CV_EPS))


def noisy_load_loss(clean: np.ndarray, noisy: np.ndarray, std: np.ndarray, k: int) -> float:
    """The "load" loss CV(smooth_load)^2 of noisy top-K gating; 0.0 when T = 0."""
    if clean.shape[0] == 0:
        return 0.0
    return cv_squared(smooth_load(clean, noisy, std, k))


def noisy_load_loss_backward(clean: np.ndarray, noisy: np.ndarray, std: np.ndarray, k: int,
                             coef: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partial derivatives of coef * noisy_load_loss: (d clean, d noisy, d std), each `[T, E]`.

    Through the thresholds, d noisy[t, m] collects -dP/dz / std from every e whose threshold is
    expert m. The caller adds d noisy to the gradient of H = clean + eps * std.
    """
    T, E = clean.shape
    zeros = np.zeros_like(clean)
    if T == 0:
        return zeros, zeros.copy(), zeros.copy()
    m_idx = noise_thresholds(noisy, k)  # [T, E]
    thr = np.take_along_axis(noisy, m_idx, axis=-1)  # [T, E]
    z = (clean - thr) / std  # [T, E]
    load = normal_cdf(z).sum(axis=0)  # [E]
    m = load.mean()
    den = m * m + _CV_EPS
    dload = coef * (2.0 * (load - m) / E / den - load.var() * 2.0 * m / (E * den * den))  # [E]
    dz = dload[None, :] * normal_pdf(z)  # [T, E]
    dclean = dz / std
    dstd = -dz * z / std
    dnoisy = np.zeros_like(clean)
    np.add.at(dnoisy, (np.arange(T)[:, None].repeat(E, axis=1), m_idx), -dz / std)
    return dclean, dnoisy, dstd
