"""The whole MoELayer, forward + backward, per backend, against a PyTorch autograd layer."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..backend import backends
from ..layer import MoELayer
from . import torch_peer


def layer_contenders(T: int, D: int, H: int, E: int, K: int, capacity_factor: float,
                     use_torch: bool, dense: bool,
                     seed: int = 0) -> tuple[dict[str, Callable[[], None]], dict[str, str], int]:
    """(name -> forward+backward callable, name -> why skipped, rows the experts compute).

    Every contender starts from the same parameters and data; the aux loss is on (coef 0.01).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)
    kw = dict(d_model=D, d_hidden=H, num_experts=E, k=K, capacity_factor=capacity_factor,
              aux_loss_coef=0.01, dtype=np.float32, seed=seed)
    fns: dict[str, Callable[[], None]] = {}
    skipped: dict[str, str] = {}
    layers = {"numpy indexed": MoELayer(backend="numpy", **kw)}
    if backends()["c"].available:
        layers["C"] = MoELayer(backend="c", **kw)
    else:
        skipped["C"] = backends()["c"].detail
    if dense:
        layers["numpy dense"] = MoELayer(formulation="dense", **kw)
    for name, layer in layers.items():
        fns[name] = (lambda m: lambda: (m.forward(x), m.backward(dy)))(layer)
    ref = layers["numpy indexed"]
    ref.forward(x)
    rows = int(ref.routing.kept.sum())
    ok, why = torch_peer.available()
    if use_torch and ok:
        fns["torch autograd"] = torch_peer.torch_layer(ref.params, x, dy, K, capacity_factor, 0.01)
    elif use_torch:
        skipped["torch autograd"] = why
    return fns, skipped, rows


def expert_flops(rows: int, D: int, H: int) -> int:
    """FLOPs of the expert matmuls: 2 forward and 4 backward [rows, D] x [D, H]-sized products."""
    return 12 * rows * D * H


def sgemm(T: int, D: int, H: int, calls: int = 1) -> tuple[Callable[[], None], int, str]:
    """(`calls` back-to-back float32 matmuls [T, D] x [D, H] into a preallocated output, the
    FLOPs of one, the row name): the rate the layer's expert matmuls are held to, timed in the
    layer's rotation. Several calls per timed sample, so that the sample lasts about as long as
    the layer's: a 10 ms sample meets a noisy neighbour for all of its length or not at all, and
    the rate it gave swung from 85 to 123 GFLOP/s between two runs of the same benchmark."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((T, D), dtype=np.float32)
    b = rng.standard_normal((D, H), dtype=np.float32)
    out = np.empty((T, H), np.float32)

    def run() -> None:
        for _ in range(calls):
            np.matmul(a, b, out=out)
    return run, 2 * T * D * H, f"one sgemm [{T}, {D}] x [{D}, {H}]"
