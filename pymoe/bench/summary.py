"""The ratios README quotes, computed from one run's rows (so they are regenerated together).

    python -m pymoe.bench --out docs/bench --readme README.md   # measure, then write them
    python -m pymoe.bench.summary docs/bench/cpu.json [--readme README.md]
        # the same lines from a saved run's rows (no measuring)
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from .report import Row
from .routing import BEFORE

START, END = "<!-- bench:summary -->", "<!-- /bench:summary -->"


def _ms(rows: list[Row], section: str, op: str, impl: str) -> float | None:
    return next((r.ms for r in rows if r.section.startswith(section) and r.op == op
                 and r.impl.startswith(impl) and r.ms is not None), None)


def _fmt(lo: float, hi: float, digits: int = 2) -> str:
    a, b = f"{lo:.{digits}f}", f"{hi:.{digits}f}"
    return a if a == b else f"{a}-{b}"


def _shape(section: str) -> str:
    return section.split(": ", 1)[1].split(" capacity")[0]


def c_vs_numpy(rows: list[Row], c_all: str) -> str | None:
    """One line: how much faster C is than the NumPy reference at route(), at dispatch + combine
    and at a whole layer's forward+backward, each over the shapes this run measured."""
    route, moves, layer = [], [], []
    for sec in dict.fromkeys(r.section for r in rows if r.op == "route"):
        c = _ms(rows, sec, "route", c_all) or _ms(rows, sec, "route", "C 1 thread")
        numpy = _ms(rows, sec, "route", "numpy (ref")
        if c and numpy:
            route.append(numpy / c)
    for sec in dict.fromkeys(r.section for r in rows if r.op == "dispatch" and r.T is None):
        times = [(_ms(rows, sec, op, "numpy indexed"), _ms(rows, sec, op, c_all))
                 for op in ("dispatch", "combine")]
        if all(n and c for n, c in times):
            moves.append(sum(n for n, _ in times) / sum(c for _, c in times))
    for sec in dict.fromkeys(r.section for r in rows if r.op == "fwd+bwd"
                             and not r.section.startswith("gated")):
        c, numpy = _ms(rows, sec, "fwd+bwd", "C"), _ms(rows, sec, "fwd+bwd", "numpy indexed")
        if c and numpy:
            layer.append(numpy / c)
    parts = [f"{what} {_fmt(min(v), max(v), digits)}x ({len(v)} shape{'s' * (len(v) > 1)})"
             for what, v, digits in (("route()", route, 1), ("dispatch + combine", moves, 1),
                                     ("a whole layer forward+backward", layer, 2)) if v]
    if not parts:
        return None
    return "- C's speed-up over the NumPy reference, same run: " + ", ".join(parts)


# issue 26's targets: (ideal, HF) per shape name; torch batched >= 2x at E=64
GATED_TARGETS = {"Mixtral-like": (1.15, 1.25), "DeepSeek-like": (1.3, 2.0)}


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def gated_lines(rows: list[Row]) -> list[str]:
    """One line per gated-layer section and op: pymoe C's time, its multiple of the sgemm-rate
    ideal, its speed-up over HF's fastest CPU block and over the batched torch layer, each with
    the target it is held to; and the T sweep's time per token."""
    out = []
    for sec in dict.fromkeys(r.section for r in rows if r.section.startswith("gated layer (")):
        name = sec.split("(", 1)[1].split(",", 1)[0]
        t_ideal, t_hf = GATED_TARGETS.get(name, (None, None))
        E = int(sec.split(" E=")[1].split()[0])
        for op in ("fwd", "fwd+bwd"):
            c = _ms(rows, sec, op, "pymoe C")
            sg = next((r for r in rows if r.section == sec and r.op == op
                       and r.impl.startswith("sgemm")), None)
            hf = next((r for r in rows if r.section == sec and r.op == op
                       and r.impl == "HF block (fastest)" and r.ms), None)
            tb = _ms(rows, sec, op, "torch batched")
            if not c or sg is None:
                continue
            ideal = float(sg.note.split("ideal ")[1].split(" ms")[0])
            line = f"- gated layer {op}, {_shape_gated(sec)}: pymoe C {c:.1f} ms, {c / ideal:.2f}x "
            line += "the same-run sgemm-rate ideal"
            if t_ideal:
                line += f" (target <= {t_ideal}x: {_verdict(c / ideal <= t_ideal)})"
            if hf:
                impl = hf.note.split(", ")[1] if ", " in hf.note else "?"
                line += (f"; {hf.ms / c:.2f}x speed-up over HF transformers' fastest CPU block "
                         f"({impl}, {hf.ms:.1f} ms)")
                if t_hf:
                    line += f" (target >= {t_hf}x: {_verdict(hf.ms / c >= t_hf)})"
            if tb:
                line += f"; {tb / c:.2f}x speed-up over the batched torch autograd layer"
                if E >= 64:
                    line += f" (target >= 2x: {_verdict(tb / c >= 2)})"
            gg = _ms(rows, sec, op, "pymoe, opt-in grouped")
            if gg:
                line += f"; with the opt-in grouped GEMM {gg:.1f} ms ({gg / ideal:.2f}x the ideal)"
            out.append(line)
    sweep = sorted((r.T, r.ms) for r in rows if r.section.startswith("gated layer fwd+bwd vs T")
                   and r.ms and r.T)
    if len(sweep) >= 2:
        per = [ms / T * 1e3 for T, ms in sweep]
        out.append(f"- gated layer fwd+bwd vs T (pymoe C): {min(per):.1f}-{max(per):.1f} us per "
                   f"token over T = {sweep[0][0]} to {sweep[-1][0]}")
    return out


def _shape_gated(section: str) -> str:
    return section.split(": ", 1)[1].split(" float32")[0]


def summary_lines(rows: list[Row]) -> list[str]:
    """Markdown bullet lines, one per headline ratio that this run measured."""
    c_rows = [r for r in rows if r.impl.startswith("C ") and "threads" in r.impl]
    c_all = max((r.impl for r in c_rows), default="C 1 thread")
    out = [line] if (line := c_vs_numpy(rows, c_all)) else []
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
        shape = _shape(sec)
        before, numpy = _ms(rows, sec, "route", BEFORE), _ms(rows, sec, "route", "numpy (ref")
        c = _ms(rows, sec, "route", c_all) or _ms(rows, sec, "route", "C 1 thread")
        if c is None:
            continue
        line = f"- route() in C at {shape}: {c:.1f} ms"
        if before:
            line += f", {before / c:.1f}x speed-up over the route before C top-k ({before:.1f} ms)"
        if numpy:
            line += f", {numpy / c:.1f}x speed-up over the NumPy reference"
        sort = _ms(rows, sec, "route", "np.argsort")
        if sort:
            line += f", {c / sort:.3f}x the time of a stable argsort of the logits ({sort:.1f} ms)"
        dc = _ms(rows, sec, "route", "C dispatch + combine")
        if dc:
            line += f"; {c / dc:.2f}x the time of C dispatch + combine of the same problem"
        out.append(line)
    for sec in dict.fromkeys(r.section for r in rows if r.op == "fwd+bwd"
                             and not r.section.startswith("gated")):
        shape = _shape(sec)
        layer = next((r for r in rows if r.section == sec and r.impl == "C" and r.ms), None)
        torch = _ms(rows, sec, "fwd+bwd", "torch autograd")
        numpy = _ms(rows, sec, "fwd+bwd", "numpy indexed")
        if layer is None:
            continue
        line = f"- layer forward+backward at {shape}: {layer.ms:.1f} ms"
        if numpy:
            line += f", {numpy / layer.ms:.2f}x speed-up over the NumPy layer ({numpy:.1f} ms)"
        line += f", {layer.note.split(',')[0]} of its expert FLOPs"
        if torch:
            line += f", {torch / layer.ms:.1f}x speed-up over the torch autograd layer"
        out.append(line)
    sweep = [r for r in rows if r.T is not None and r.ms is not None and r.op == "dispatch"]
    if sweep:
        for impl in dict.fromkeys(r.impl for r in sweep):
            pts = sorted((r.T, r.ms) for r in sweep if r.impl == impl)
            if len(pts) >= 2:
                (t0, m0), (t1, m1) = pts[0], pts[-1]
                out.append(f"- dispatch, {impl}: {m0:.2f} ms at T={t0}, {m1:.1f} ms at T={t1} "
                           f"({m1 / m0:.0f}x for {t1 // t0}x the tokens)")
    return out + gated_lines(rows)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pymoe.bench.summary",
                                 description="the summary lines of a saved benchmark run")
    ap.add_argument("json", help="a run's JSON (python -m pymoe.bench --json/--out), e.g. "
                    "docs/bench/cpu.json")
    ap.add_argument("--readme", metavar="PATH", help="also write them between this file's "
                    f"{START} markers")
    args = ap.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        rows = [Row(**r) for r in json.load(f)["rows"]]
    lines = summary_lines(rows)
    print("\n".join(lines))
    if args.readme:
        update_readme(args.readme, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
