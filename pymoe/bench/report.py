"""Benchmark rows: the printed table, the JSON file and the optional plot."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class Row:
    section: str  # the problem, e.g. "T=16384 D=1024 E=64 K=2 ..." or "layer ..."
    op: str  # dispatch, combine, dispatch_bwd, combine_bwd, fwd+bwd
    impl: str  # numpy dense, numpy indexed, C 1 thread, C 2 threads, torch, ...
    ms: float | None  # median milliseconds; None when skipped
    gbps: float | None = None  # effective GB/s: bytes that must be read + written / time
    x_copy: float | None = None  # gbps / same-run copy bandwidth
    gflops: float | None = None  # for layer rows: expert-matmul GFLOP/s
    note: str = ""


def format_table(rows: list[Row]) -> str:
    lines, section = [], None
    for r in rows:
        if r.section != section:
            section = r.section
            lines += ["", section,
                      f"  {'op':13s} {'impl':38s} {'ms':>9s} {'GB/s':>7s} {'x copy':>7s}  note"]
        if r.ms is None:
            lines.append(f"  {r.op:13s} {r.impl:38s} {'-':>9s} {'-':>7s} {'-':>7s}  {r.note}")
            continue
        gb = f"{r.gbps:7.2f}" if r.gbps is not None else f"{'':7s}"
        xc = f"{r.x_copy:7.2f}" if r.x_copy is not None else f"{'':7s}"
        note = r.note if r.gflops is None else f"{r.gflops:.0f} GFLOP/s in expert matmuls {r.note}"
        lines.append(f"  {r.op:13s} {r.impl:38s} {r.ms:9.2f} {gb} {xc}  {note}".rstrip())
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    """The same rows as a Markdown table (for README)."""
    out = ["| problem | op | impl | ms | GB/s | x copy | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        cells = [r.section, r.op, r.impl,
                 "-" if r.ms is None else f"{r.ms:.2f}",
                 "" if r.gbps is None else f"{r.gbps:.2f}",
                 "" if r.x_copy is None else f"{r.x_copy:.2f}",
                 r.note if r.gflops is None else f"{r.gflops:.0f} GFLOP/s {r.note}".strip()]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_json(path: str, meta: dict, rows: list[Row], checks: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows], "targets": checks}, f,
                  indent=1)


def plot(path: str, rows: list[Row], copy_gbps: float) -> str:
    """Bar charts of GB/s per problem and of the layer times; returns a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot: matplotlib is not installed (pip install 'pymoe[viz]'); no plot drawn"
    sections = [s for s in dict.fromkeys(r.section for r in rows) if not s.startswith("layer")]
    layer = [r for r in rows if r.section.startswith("layer") and r.ms is not None]
    n = len(sections) + (1 if layer else 0)
    fig, axes = plt.subplots(n, 1, figsize=(12, 3.2 * n), squeeze=False)
    for ax, sec in zip(axes[:, 0], sections):
        srows = [r for r in rows if r.section == sec and r.gbps is not None]
        ops = list(dict.fromkeys(r.op for r in srows))
        impls = list(dict.fromkeys(r.impl for r in srows))
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            vals = [next((r.gbps for r in srows if r.op == op and r.impl == impl), 0) for op in ops]
            ax.bar([o + i * width for o in range(len(ops))], vals, width, label=impl)
        ax.axhline(copy_gbps, color="k", ls="--", lw=1, label=f"np.copyto {copy_gbps:.1f} GB/s")
        ax.set_xticks([o + width * (len(impls) - 1) / 2 for o in range(len(ops))], ops)
        ax.set_yscale("log")  # the dense einsums sit ~1000x below the compiled rows
        ax.set_ylabel("effective GB/s (log)")
        ax.set_title(sec, fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if layer:
        ax = axes[-1, 0]
        ax.barh([r.impl for r in layer], [r.ms for r in layer], color="tab:gray")
        ax.set_xlabel("ms (forward + backward), lower is better")
        ax.set_title(layer[0].section, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
