"""Helpers shared by the test modules, which import them from here explicitly.

Sections: paths and builds; optional packages; finite differences; tolerances; the loop oracle;
the torch autograd oracle; pictures.
"""
from __future__ import annotations

import importlib
import math
import os
import shutil
import struct
import warnings
from decimal import Decimal
from types import ModuleType

import numpy as np
import pytest

from pymoe import viz

# ------------------------------------------------------------------------- paths and builds


def copy_package(dst) -> None:
    """pymoe/'s sources into dst/pymoe, without build products (compiled core, generated header,
    build status, caches): a package as a fresh checkout has it."""
    shutil.copytree(os.path.join(REPO, "pymoe"), os.path.join(dst, "pymoe"),
                    ignore=shutil.ignore_patterns("*.so", "_pymoe_cuda.h", "__pycache__",
                                                  "_c_build_status.txt"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_build_module():
    """csrc/cuda/build.py, imported from the source tree (it is not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pymoe_cuda_build", os.path.join(REPO, "csrc", "cuda", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gpu_visible() -> tuple[bool, str]:
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install 'pymoe-routing[cuda]')"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as err:  # no driver, or a driver but no device
        return False, f"no GPU: {err}"
    return (n > 0), f"{n} GPU(s) visible" if n else "no GPU visible"


# ------------------------------------------------------------------------- optional packages
# A test needing an optional package (an extra) skips with the reason where it is missing; under
# PYMOE_REQUIRE_OPTIONAL=1 (CI, which installs every extra) it fails instead, so that a missing or
# broken install cannot pass as 'skipped'.
def backend_by_name(name: str, request):
    """The backend called `name`; "c" through the c_backend fixture (a skip with the reason where it
    is not built, a failure under PYMOE_REQUIRE_C=1)."""
    if name == "c":
        return request.getfixturevalue("c_backend")
    from pymoe import get_backend

    return get_backend(name)


REQUIRE_OPTIONAL_ENV = "PYMOE_REQUIRE_OPTIONAL"


def require_optional(available: bool, reason: str, *, module_level: bool = False) -> None:
    """Skip (or, under PYMOE_REQUIRE_OPTIONAL=1, fail) with `reason` unless `available`."""
    if available:
        return
    if os.environ.get(REQUIRE_OPTIONAL_ENV) == "1":
        pytest.fail(f"{REQUIRE_OPTIONAL_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def import_optional(name: str, extra: str, *, module_level: bool = True) -> ModuleType:
    """Import `name`, or require_optional's skip/fail naming the pymoe extra that installs it.

    Import warnings (the systems' own CPU-only notices) are silenced.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception as err:  # ImportError, or a package that is installed but broken
        require_optional(False, f"{name} unavailable ({type(err).__name__}: {err}); "
                                f"pip install 'pymoe-routing[{extra}]'", module_level=module_level)
        raise  # not reached: require_optional skips or fails


# ------------------------------------------------------------------------- finite differences
# (central differences in float64, shared by the gradient tests of every backend)
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


# ------------------------------------------------------------------------- tolerances
# How closely each compiled path must match the NumPy reference, and why. Stated once, used by
# every backend's tests.
#
# - Integers (expert_index, position, slot_owner, masks, counts): exactly equal.
# - dispatch and combine: bitwise equal. They do the same products and sums in the same order as
#   pymoe.indexed (y = 0 + w0*r0 + w1*r1 ..., rows scaled by their weight), and the C core is built
#   with -ffp-contract=off, so no fused multiply-add changes a rounding.
# - gate gradient: a dot product over D whose summation order differs from NumPy's einsum. The
#   standard bound for a float dot product (Higham, Accuracy and Stability, eq. 3.5) is
#   |computed - exact| <= gamma_D * sum_d |a_d * b_d| with gamma_D ~ D * eps; two such sums differ
#   by at most twice that, which is the tolerance (per entry, nothing hand-tuned).
# - Router probabilities computed by a kernel (expf/exp and a sequential sum) against NumPy's
#   (its own vectorised exp and pairwise sums): each is within a few ulps of the exact value, so
#   they agree to PROB_RTOL = 8 ulps of the dtype; gates are probabilities (or a ratio of them),
#   so they get GATE_RTOL = twice that.
# - Quantities downstream of the gate gradient (router gradients of a whole layer): relative error
#   (norm-wise) <= 1e-5 in float32 and <= 1e-12 in float64, a few ulps amplified by the softmax
#   backward and one matmul.
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


# ------------------------------------------------------------------------- the loop oracle
# An independent, loop-by-loop implementation of the routing semantics, for the tests only.
#
# Written from the convention list in pymoe's docstrings with plain Python loops and math (no NumPy
# vectorisation, no shared code with pymoe), so that agreement means the semantics agree, not that
# the same code ran twice. The priority order for "score" routing takes the reference's own
# probabilities as its key: softmax rounding is compared separately, with a tolerance.

def oracle_route(logits, probs, num_experts, k, capacity_factor, min_capacity, normalize,
                 priority):
    """Route with loops. logits, probs: nested lists or arrays [T][E]. Returns a dict."""
    T, E = len(logits), num_experts
    L = [[float(v) for v in row] for row in logits]
    P = [[float(v) for v in row] for row in probs]
    # top-K by logit, ties to the lower expert
    index = [sorted(range(E), key=lambda e: (-L[t][e], e))[:k] for t in range(T)]
    gate = []
    for t in range(T):
        g = [P[t][e] for e in index[t]]
        if normalize:
            s = sum(g)
            g = [v / s for v in g]
        gate.append(g)
    load = [0] * E
    for t in range(T):
        for e in index[t]:
            load[e] += 1
    if capacity_factor is None:
        cap = max(load) if T else 0
    else:
        cap = math.ceil(k * T * Decimal(repr(capacity_factor)) / E)  # exact decimal arithmetic
    cap = min(max(cap, min_capacity), T)
    if priority == "choice":
        order = list(range(T))
    else:
        order = sorted(range(T), key=lambda t: (-max(P[t]), t))
    count = [0] * E
    position = [[-1] * k for _ in range(T)]
    for j in range(k):  # choice-major: every first choice before any second choice
        for t in order:
            e = index[t][j]
            if count[e] < cap:
                position[t][j] = count[e]
            count[e] += 1
    kept = [[position[t][j] >= 0 for j in range(k)] for t in range(T)]
    gate_kept = [[gate[t][j] if kept[t][j] else 0.0 for j in range(k)] for t in range(T)]
    dispatch = np.zeros((T, E, cap), dtype=bool)
    combine = np.zeros((T, E, cap))
    for t in range(T):
        for j in range(k):
            if kept[t][j]:
                dispatch[t, index[t][j], position[t][j]] = True
                combine[t, index[t][j], position[t][j]] = gate[t][j]
    if T:
        aux = E * sum(load[e] / (T * k) * sum(P[t][e] for t in range(T)) / T for e in range(E))
        z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in L) / T
    else:
        aux = z = 0.0
    return dict(expert_index=np.array(index, dtype=np.int64).reshape(T, k),
                gate=np.array(gate_kept).reshape(T, k), position=np.array(position).reshape(T, k),
                kept=np.array(kept, dtype=bool).reshape(T, k), capacity=cap,
                expert_load=np.array(load), token_order=np.array(order, dtype=np.int64),
                dispatch_mask=dispatch, combine_weights=combine, aux_loss=aux, z_loss=z)


def oracle_softmax(logits):
    out = []
    for row in logits:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        out.append([v / s for v in ex])
    return np.array(out)


def oracle_layer_forward(layer, x):
    """y [T, D] token by token: y[t] = sum over kept j of gate * FFN_e(x[t]), in float64 loops."""
    p = {n: v.astype(np.float64) for n, v in layer.params.items()}
    act = {"relu": lambda a: np.maximum(a, 0.0),
           "gelu": lambda a: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
           }[layer.activation]
    x = np.asarray(x, dtype=np.float64).reshape(-1, layer.d_model)
    logits = x @ p["w_router"] + p["b_router"]
    probs = oracle_softmax(logits.tolist()) if len(x) else np.zeros((0, layer.num_experts))
    r = oracle_route(logits, probs, layer.num_experts, layer.k, layer.capacity_factor, layer.min_capacity,
                     layer.normalize, layer.priority)
    y = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(layer.k):
            if r["kept"][t, j]:
                e = r["expert_index"][t, j]
                h = act(x[t] @ p["w1"][e] + p["b1"][e])
                y[t] += r["gate"][t, j] * (h @ p["w2"][e] + p["b2"][e])
    return y, r


# ------------------------------------------------------------------------- the torch oracle
def torch_moe(params: dict[str, np.ndarray], x: np.ndarray, k: int, capacity_factor: float | None,
              normalize: bool = False, activation: str = "relu"):
    """The MoE layer in torch index ops (topk, choice-major cumsum slots, per-expert matmuls over
    the kept tokens only, index_add), with autograd. Returns (x, params, y, aux_loss, z_loss) as
    tensors; x and params require grad. The autograd oracle of test_torch_oracle."""
    import torch

    from pymoe.capacity import expert_capacity

    p = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    xt = torch.tensor(x, requires_grad=True)
    T, E = x.shape[0], params["w_router"].shape[1]
    logits = xt @ p["w_router"] + p["b_router"]
    probs = torch.softmax(logits, dim=-1)
    gate, idx = torch.topk(probs, k, dim=-1)
    if normalize:
        gate = gate / gate.sum(-1, keepdim=True)
    with torch.no_grad():
        counts = torch.bincount(idx.reshape(-1), minlength=E)
        C = expert_capacity(T, E, k, capacity_factor, 0, counts.numpy())
        mask = torch.nn.functional.one_hot(idx.t().reshape(-1), E)  # [K*T, E] choice-major
        pos = ((torch.cumsum(mask, 0) - 1) * mask).sum(-1).reshape(k, T).t()
        kept = pos < C
    act = torch.relu if activation == "relu" else (
        lambda a: torch.nn.functional.gelu(a, approximate="tanh"))
    y = torch.zeros_like(xt)
    for e in range(E):
        t_idx, j_idx = torch.nonzero((idx == e) & kept, as_tuple=True)
        h = act(xt.index_select(0, t_idx) @ p["w1"][e] + p["b1"][e])
        out = h @ p["w2"][e] + p["b2"][e]
        y = y.index_add(0, t_idx, out * gate[t_idx, j_idx][:, None])
    aux = E * torch.sum(counts.to(probs.dtype) / (T * k) * probs.mean(0))
    z = torch.mean(torch.logsumexp(logits, -1) ** 2)
    return xt, p, y, aux, z


# ------------------------------------------------------------------------- pictures
def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_png_matches(path, fig) -> None:
    """The file exists, is a real picture, and has the figure's size at viz.DPI."""
    assert fig.dpi == viz.DPI
    w, h = fig.canvas.get_width_height()  # pixels, as matplotlib computes them
    assert path.stat().st_size > 5_000
    assert png_size(path) == (w, h)
    assert 300 <= w <= 2600 and 200 <= h <= 2600  # readable at README size, not a poster


# ------------------------------------------------------------------ bit-for-bit contract tests
def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float/int array in native order, for bit-for-bit comparison."""
    a = np.asarray(a)
    a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


def assert_same_bits(a, b):
    np.testing.assert_array_equal(bits(a), bits(b))


def c_layer_agrees_with_numpy(make_layer) -> None:
    """make_layer(backend) on "numpy" and "c", forward and backward on the same float64 data: y
    the same bits (dispatch and combine are bitwise), dx and every gradient to float64 round-off
    (the C gate gradient sums its dot product in another order: DOWNSTREAM_RTOL)."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((9, 5)), rng.standard_normal((9, 5))
    out = []
    for backend in ("numpy", "c"):
        layer = make_layer(backend)
        out.append((layer.forward(x), layer.backward(dy), dict(layer.grads)))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-12, atol=1e-12)
    for name, g in out[0][2].items():
        np.testing.assert_allclose(g, out[1][2][name], rtol=1e-12, atol=1e-12, err_msg=name)


def padding_takes_nothing_on_both_backends(k: int, **kw) -> None:
    """A float64 MoELayer(4, 5, 4, k, 1.0, **kw) on 7 real tokens and 3 padding ones: no padding
    row is selected, expert_load counts the real ones only, and the C backend's y is the NumPy
    one's (dispatch/combine bitwise, the expert matmuls to float64 round-off: 1e-12)."""
    import pymoe

    rng = np.random.default_rng(7)
    x = rng.normal(size=(10, 4))
    mask = np.array([True] * 7 + [False] * 3)
    ys = []
    for backend in ("numpy", "c"):
        layer = pymoe.MoELayer(4, 5, 4, k, 1.0, backend=backend, dtype=np.float64, **kw)
        randomize(layer, seed=3)
        ys.append(layer(x, token_mask=mask))
        assert not layer.routing.selected[~mask].any()
        assert layer.routing.expert_load.sum() == layer.routing.selected[mask].sum()
    np.testing.assert_allclose(ys[1], ys[0], rtol=1e-12, atol=1e-12)


def small_layer(**kw):
    """A small MoELayer (D=6, H=5, E=4, K=2, seed 3), keywords changing it."""
    args = dict(d_model=6, d_hidden=5, num_experts=4, k=2, seed=3)
    args.update(kw)
    import pymoe

    return pymoe.MoELayer(**args)


def layout_problems(fig) -> list[str]:
    """What a reader would see as broken in a drawn figure: a title, axis label, legend or
    suptitle reaching past the figure's edge (clipped), or two of them overlapping."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    named = []
    for i, ax in enumerate(fig.axes):
        for what, t in (("title", ax.title), ("xlabel", ax.xaxis.label),
                        ("ylabel", ax.yaxis.label)):
            if t.get_visible() and t.get_text():
                named.append((f"axes {i} {what} {t.get_text()!r}", t.get_window_extent(renderer)))
        if ax.get_legend() is not None:
            named.append((f"axes {i} legend", ax.get_legend().get_window_extent(renderer)))
    if fig._suptitle is not None:
        named.append(("suptitle", fig._suptitle.get_window_extent(renderer)))
    box, problems = fig.bbox, []
    for name, b in named:
        if b.x0 < box.x0 - 1 or b.y0 < box.y0 - 1 or b.x1 > box.x1 + 1 or b.y1 > box.y1 + 1:
            problems.append(f"{name} is clipped")
    for i, (n1, b1) in enumerate(named):
        problems += [f"{n1} overlaps {n2}" for n2, b2 in named[i + 1:] if b1.overlaps(b2)]
    return problems


def check_group_gradients(layer, x: np.ndarray, dy: np.ndarray,
                          token_mask: np.ndarray | None = None) -> list:
    """A token_groups = G layer's gradients against central differences: parameters get the
    gradient of J = (1/G) sum_g L_g, and x that of L_g = G dJ/dx_g (each group's own loss; with
    a token_mask, L_g has the real rows of y only). Asserts no routing decision moved while
    perturbing; returns the routings of the first pass."""
    G = layer.token_groups
    real = 1.0 if token_mask is None else token_mask[..., None]

    def objective() -> float:
        return float(np.sum(layer.forward(x, token_mask) * dy * real)) / G + layer.loss_terms()

    objective()
    routings = layer.routing
    dx = layer.backward(dy)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    errors = {"x": rel_error(dx, G * numerical_grad(objective, x))}
    for name, p in layer.params.items():
        errors[name] = rel_error(grads[name], numerical_grad(objective, p))
    objective()
    for a, b in zip(routings, layer.routing):  # no routing decision moved while perturbing
        np.testing.assert_array_equal(a.position, b.position)
    assert max(errors.values()) <= FD_RTOL, errors
    return list(routings)
