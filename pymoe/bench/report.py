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
    T: int | None = None  # the token count, for the rows of the T sweep


def format_table(rows: list[Row]) -> str:
    lines, section = [], None
    for r in rows:
        if r.section != section:
            section = r.section
            lines += ["", section,
                      f"  {'op':13s} {'impl':38s} {'ms':>9s} {'GB/s':>7s} {'x copy':>7s}  note"]
        op = r.op if r.T is None else f"{r.op} T={r.T}"
        if r.ms is None:
            lines.append(f"  {op:13s} {r.impl:38s} {'-':>9s} {'-':>7s} {'-':>7s}  {r.note}")
            continue
        gb = f"{r.gbps:7.2f}" if r.gbps is not None else f"{'':7s}"
        xc = f"{r.x_copy:7.2f}" if r.x_copy is not None else f"{'':7s}"
        note = r.note if r.gflops is None else f"{r.gflops:.0f} GFLOP/s in expert matmuls {r.note}"
        lines.append(f"  {op:13s} {r.impl:38s} {r.ms:9.2f} {gb} {xc}  {note}".rstrip())
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    """The same rows as a Markdown table (for README)."""
    out = ["| problem | op | impl | ms | GB/s | x copy | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        cells = [r.section, r.op if r.T is None else f"{r.op} T={r.T}", r.impl,
                 "-" if r.ms is None else f"{r.ms:.2f}",
                 "" if r.gbps is None else f"{r.gbps:.2f}",
                 "" if r.x_copy is None else f"{r.x_copy:.2f}",
                 r.note if r.gflops is None else f"{r.gflops:.0f} GFLOP/s {r.note}".strip()]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_json(path: str, meta: dict, rows: list[Row], summary: list[str] | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows], "summary": summary or []}, f,
                  indent=1)


def plot(path: str, rows: list[Row], copy_gbps: float) -> str:
    """Draw the table with pymoe.viz.benchmark_bars; returns a message."""
    from ..viz import benchmark_bars, have_matplotlib

    if not have_matplotlib():
        return "--plot: matplotlib is not installed (pip install 'pymoe-routing[viz]'); no plot drawn"
    benchmark_bars(rows, path, reference=copy_gbps)
    return f"plot written to {path}"
