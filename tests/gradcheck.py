"""Central finite differences in float64, shared by the gradient tests of every backend."""
from __future__ import annotations

import numpy as np

# Central differences have truncation error O(eps^2) and round-off O(1e-16 / eps); eps = 1e-6
# balances them near 1e-10 relative, well inside the 1e-6 the project asks for.
FD_EPS = 1e-6
FD_RTOL = 1e-6


def numerical_grad(f, a: np.ndarray, eps: float = FD_EPS) -> np.ndarray:
    """d f() / d a by central differences, perturbing `a` in place one entry at a time."""
    g = np.zeros_like(a, dtype=np.float64)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + eps
        fp = f()
        a[idx] = old - eps
        fm = f()
        a[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """||a - n|| / max(||a||, ||n||), 0 when both vanish."""
    scale = max(np.linalg.norm(analytic), np.linalg.norm(numeric))
    return 0.0 if scale == 0 else float(np.linalg.norm(analytic - numeric) / scale)


def randomize(layer, seed: int, scale: float = 1.0) -> None:
    """Give every parameter (biases too) non-trivial random values, so no gradient is 0 by luck."""
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        p[...] = rng.normal(0.0, scale / np.sqrt(max(p.shape[-2] if p.ndim > 1 else 4, 1)), p.shape)
    layer.params["w_router"] *= 4.0  # confident routing: margins far above the FD step


def check_layer_gradients(layer, x: np.ndarray, dy: np.ndarray, train: bool = False,
                          reset_noise=None) -> dict[str, float]:
    """Compare layer.backward with finite differences for every parameter and x.

    Returns the relative error per name; asserts that routing decisions did not move while
    perturbing (they are piecewise constant, so a flip would make the difference meaningless).
    """
    def objective() -> float:
        if reset_noise is not None:
            reset_noise()
        y = layer.forward(x, train=train)
        return float(np.sum(y * dy)) + layer.loss_terms()

    objective()
    base = layer.routing
    dx = layer.backward(dy)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    errors = {"x": rel_error(dx, numerical_grad(objective, x))}
    for name, p in layer.params.items():
        errors[name] = rel_error(grads[name], numerical_grad(objective, p))
    objective()
    np.testing.assert_array_equal(layer.routing.position, base.position)
    np.testing.assert_array_equal(layer.routing.expert_index, base.expert_index)
    return errors
