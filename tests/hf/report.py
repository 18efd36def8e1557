"""The family table of docs/hf.md, measured: every family of pymoe.hf.families() against its HF
block (tiny.compare), float64 and float32.

    python tests/hf/report.py                 # print the table
    python tests/hf/report.py --write docs/hf.md   # replace the table between its markers

Needs the crosscheck extra (torch, transformers). About 2 minutes on the 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]

from tiny import XFAIL, compare, tolerances  # noqa: E402

import pymoe.hf  # noqa: E402

BEGIN, END = "<!-- hf-table -->", "<!-- /hf-table -->"


def row(family: str, info: dict[str, str]) -> str:
    cells = []
    for dtype in (np.float64, np.float32):
        reason = XFAIL.get(family, {}).get(np.dtype(dtype).name)
        if reason is not None:
            cells.append("HF's block fails")
            continue
        c = compare(family, dtype)
        fwd, bwd = tolerances(family, dtype)
        ok = (c.chosen_differ == 0 and c.state_exact and c.y <= fwd and c.dx <= bwd
              and max(c.grads.values()) <= bwd)
        cells.append(f"{c.y:.0e} / {c.dx:.0e} / {max(c.grads.values()):.0e}"
                     + ("" if ok else " FAILS"))
    return (f"| {family} | {info['preset']} | {info['form']} | {info['router_dtype']} | "
            f"{cells[0]} | {cells[1]} | {info['note']} |")


def table() -> str:
    head = ("| family | preset | expert form | HF router in | float64: y / dx / grads | "
            "float32: y / dx / grads | note |\n|---|---|---|---|---|---|---|")
    return "\n".join([head] + [row(f, i) for f, i in pymoe.hf.families().items()])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", help="a markdown file whose table (between the markers) to replace")
    args = ap.parse_args(argv)
    text = table()
    print(text)
    if args.write:
        doc = open(args.write).read()
        a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        with open(args.write, "w") as f:
            f.write(doc[:a] + "\n" + text + "\n" + doc[b:])


if __name__ == "__main__":
    main()
