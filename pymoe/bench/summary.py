"""The ratios README quotes, computed from one run's rows (so they are regenerated together)."""
from __future__ import annotations

import re

from .report import Row
from .routing import BEFORE

START, END = "<!-- bench:summary -->", "<!-- /bench:summary -->"


def _ms(rows: list[Row], section: str, op: str, impl: str) -> float | None:
    return next((r.ms for r in rows if r.section.startswith(section) and r.op == op
                 and r.impl.startswith(impl) and r.ms is not None), None)


def _fmt(lo: float, hi: float) -> str:
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def summary_lines(rows: list[Row]) -> list[str]:
    """Markdown bullet lines, one per headline ratio that this run measured."""
    out = []
    c_rows = [r for r in rows if r.impl.startswith("C ") and "threads" in r.impl]
    c_all = max((r.impl for r in c_rows), default="C 1 thread")
    ops_secs = list(dict.fromkeys(r.section for r in rows if r.op in ("dispatch", "combine")
                                  and r.T is None))
    for op in ("dispatch", "combine", "dispatch_bwd", "combine_bwd"):
        xc = [r.x_copy for r in rows if r.op == op and r.impl == c_all and r.x_copy is not None
              and r.T is None]
        vs = [t / c for s in ops_secs
              if (c := _ms(rows, s, op, c_all)) and (t := _ms(rows, s, op, "torch (best"))]
        if xc:
            line = f"- C {op} ({c_all}): {_fmt(min(xc), max(xc))}x the same-run np.copyto rate"
            if vs:
                line += f", {_fmt(min(vs), max(vs))}x speed-up over torch's best form"
            out.append(line + f" (over {len(xc)} shapes)")
    for sec in dict.fromkeys(r.section for r in rows if r.op == "route"):
        shape = sec.split(": ", 1)[1].split(" capacity")[0]
        before, numpy = _ms(rows, sec, "route", BEFORE), _ms(rows, sec, "route", "numpy (ref")
        c = _ms(rows, sec, "route", c_all) or _ms(rows, sec, "route", "C 1 thread")
        if c is None:
            continue
        line = f"- route() in C at {shape}: {c:.1f} ms"
        if before:
            line += f", {before / c:.1f}x speed-up over the route before C top-k ({before:.1f} ms)"
        if numpy:
            line += f", {numpy / c:.1f}x speed-up over the NumPy reference"
        dc = _ms(rows, sec, "route", "C dispatch + combine")
        if dc:
            line += f"; {c / dc:.2f}x the time of C dispatch + combine of the same problem"
        out.append(line)
    for sec in dict.fromkeys(r.section for r in rows if r.op == "fwd+bwd"):
        shape = sec.split(": ", 1)[1].split(" capacity")[0]
        layer = next((r for r in rows if r.section == sec and r.impl == "C" and r.ms), None)
        torch = _ms(rows, sec, "fwd+bwd", "torch autograd")
        if layer is None:
            continue
        line = (f"- layer forward+backward at {shape}: {layer.ms:.1f} ms, "
                f"{layer.note.split(',')[0]} of its expert FLOPs")
        if torch:
            line += f", {torch / layer.ms:.1f}x speed-up over the torch autograd layer"
        out.append(line)
    sweep = [r for r in rows if r.T is not None and r.ms is not None]
    if sweep:
        for impl in dict.fromkeys(r.impl for r in sweep):
            pts = sorted((r.T, r.ms) for r in sweep if r.impl == impl)
            if len(pts) >= 2:
                (t0, m0), (t1, m1) = pts[0], pts[-1]
                out.append(f"- dispatch, {impl}: {m0:.2f} ms at T={t0}, {m1:.1f} ms at T={t1} "
                           f"({m1 / m0:.0f}x for {t1 // t0}x the tokens)")
    return out


def update_readme(path: str, summary: list[str]) -> None:
    """Replace the text between README's summary markers with this run's lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"{path}: no {START} ... {END} block to rewrite")
    block = START + "\n" + "\n".join(summary) + "\n" + END
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
