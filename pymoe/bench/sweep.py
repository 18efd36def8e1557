"""Dispatch time against the number of tokens T: the dense einsum grows as T^2 (its [T, E, C]
mask has C proportional to T), the indexed forms as T."""
from __future__ import annotations

import numpy as np

from ..backend import backends, get_backend
from .ops import c_core, make_problem, numpy_dense, numpy_indexed
from .report import Row
from .timing import time_round_robin

SWEEP_T = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DENSE_MAX_S = 3.0  # past this, the next (T^2) dense point would take minutes: skipped, and said


def sweep_rows(Ts: tuple[int, ...], D: int, E: int, K: int, capacity_factor: float,
               repeats: int) -> list[Row]:
    sec = f"dispatch vs T: D={D} E={E} K={K} capacity_factor={capacity_factor:g} float32"
    rows: list[Row] = []
    c = get_backend("c") if backends()["c"].available else None
    dense_last = 0.0
    for T in Ts:
        p = make_problem(T, D, E, K, capacity_factor, np.dtype(np.float32))
        fns = {"numpy indexed": numpy_indexed(p)["dispatch"]}
        if c is not None:
            fns[f"C {c.default_num_threads} threads"] = c_core(p, c, c.default_num_threads)["dispatch"]
        why = None
        if dense_last > DENSE_MAX_S:
            why = f"skipped: {dense_last:.1f} s at T={T // 2}, and it grows as T^2"
        else:
            dense = numpy_dense(p)
            if isinstance(dense, str):
                why = dense
            else:
                fns["numpy dense"] = dense["dispatch"]
        times = time_round_robin(fns, repeats)
        for impl, (t, runs) in times.items():
            rows.append(Row(sec, "dispatch", impl, t * 1e3, T=T,
                            note="" if runs > 1 else "one timed call (slow)"))
        if why is None:
            dense_last = times["numpy dense"][0]
        else:
            rows.append(Row(sec, "dispatch", "numpy dense", None, T=T, note=why))
    return rows


def plot_sweep(path: str, rows: list[Row]) -> str:
    """Log-log ms against T, one line per implementation."""
    from ..viz import have_matplotlib

    if not have_matplotlib():
        return "matplotlib is not installed (pip install 'pymoe-routing[viz]'); no sweep plot drawn"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for impl in dict.fromkeys(r.impl for r in rows):
        pts = [(r.T, r.ms) for r in rows if r.impl == impl and r.ms is not None]
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=impl)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("dispatch time (ms)")
    ax.set_title(rows[0].section if rows else "", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"sweep plot written to {path}"
