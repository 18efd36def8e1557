"""python -m pymoe.bench.profile: where a gated layer's forward+backward time goes.

For each of pymoe.bench.gated.SHAPES, pymoe's C layer (loaded from HF's block, as the benchmark
does) runs forward+backward; the time is split into the expert matmuls (every np.matmul that
pymoe.experts makes, routed and shared experts), the C core's calls (dispatch, combine, epilogues,
top-K, gate gradient), and the rest (routing glue in NumPy, bias adds and bias-gradient sums,
argument and finiteness checks, allocation), next to the ideal: the expert FLOPs at the rate of
one large sgemm timed in the same process. Needs torch and transformers (HF's block).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import types

import numpy as np

from .._checks import cli_int
from . import gated
from .layer import sgemm


def profile(name: str, repeats: int = 5, small: bool = False) -> tuple[str, dict[str, float]]:
    """(one line, {part: seconds}) of the step's time and its parts for SHAPES[name] (small: T,
    D, H divided by 8, a smoke test). The parts are total, matmuls, c_core, rest and ideal."""
    from .. import experts
    from ..hf import from_transformers

    T, D, H, E, K, S = gated.SHAPES[name]
    if small:
        T, D, H = T // 8, D // 8, H // 8
    layer = gated.on_backend(from_transformers(gated.hf_block(T, D, H, E, K, S)), "c")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)
    spent = [0.0]
    real = np.matmul

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    # pymoe.experts looks np.matmul up at each call: a stand-in module times every one of them
    stand_in = types.SimpleNamespace(**{n: getattr(np, n) for n in dir(np) if not n[:2] == "__"})
    stand_in.matmul = timed
    saved = experts.np
    experts.np = stand_in  # type: ignore[assignment]
    try:
        for _ in range(2):  # warm-up: buffers, BLAS threads
            layer.forward(x), layer.backward(dy)
        spent[0] = 0.0
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(repeats):
            layer.forward(x), layer.backward(dy)
        prof.disable()
        total = (time.perf_counter() - t0) / repeats
    finally:
        experts.np = saved
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    c_core = sum(v[2] for k, v in stats.items() if "pymoe._pymoe_c" in str(k)) / repeats
    mm = spent[0] / repeats
    rows = int(layer.routing.kept.sum())
    run, flops, _ = sgemm(T, D, 2 * H, 4)
    run()  # warm-up
    best = min(_seconds(run) for _ in range(3))  # the rate: the best of three 4-call samples
    ideal = 3 * gated.expert_flops(layer, rows, T) / (4 * flops / best)
    rest = total - mm - c_core
    parts = {"total": total, "matmuls": mm, "c_core": c_core, "rest": rest, "ideal": ideal}
    return (f"{name} fwd+bwd {total * 1e3:.1f} ms ({total / ideal:.2f}x the sgemm-rate ideal "
            f"{ideal * 1e3:.1f} ms): expert matmuls {mm * 1e3:.1f} ms ({mm / total:.0%}; "
            f"{mm / ideal:.2f}x the ideal alone), C core {c_core * 1e3:.1f} ms "
            f"({c_core / total:.0%}), the rest {rest * 1e3:.1f} ms ({rest / total:.0%})"), parts


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pymoe.bench.profile",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("shapes", nargs="*", metavar="SHAPE",
                    help=f"of {', '.join(gated.SHAPES)} (default: both)")
    ap.add_argument("--repeats", type=cli_int(1), default=5)
    args = ap.parse_args(argv)
    for name in args.shapes:
        if name not in gated.SHAPES:
            ap.error(f"argument SHAPE: expected one of {', '.join(gated.SHAPES)}, got {name!r}")
    args.shapes = args.shapes or list(gated.SHAPES)
    import torch  # noqa: F401  first, as in python -m pymoe.bench (one OpenMP runtime)
    for name in args.shapes:
        print(profile(name, args.repeats)[0], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
