"""Run every example in reading order and put their pictures (and printed output) in one place.

    python examples/run_all.py --out docs/img --transcripts docs/outputs
        # regenerates the pictures README shows, and the printed output its numbers come from
    python examples/run_all.py --quick             # every example in CI-sized form

Each example is also runnable on its own (python examples/01_walkthrough.py, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = ["00_why.py", "01_walkthrough.py", "01b_backward.py", "02_capacity.py", "03_train.py",
            "03b_stability_and_cost.py", "04_speed.py", "05_conventions.py", "07_variants.py",
            "09_train_serve.py"]


def load(name: str):
    """Import an example module from its file (the names start with digits)."""
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(HERE, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Tee(io.TextIOBase):
    """Write to the terminal and keep a copy."""

    def __init__(self, stream) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.stream.write(s)
        return self.copy.write(s)

    def flush(self) -> None:
        self.stream.flush()


def run(name: str, argv: list[str]) -> tuple[dict, str]:
    """main(argv) of one example; returns its result and everything it printed."""
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        result = load(name).main(argv)
    return result, tee.copy.getvalue()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="pymoe-out")
    ap.add_argument("--transcripts", default=None,
                    help="also write each example's printed output to DIR/<example>.txt")
    args = ap.parse_args(argv)
    results = {}
    for name in EXAMPLES:
        print(f"\n{'#' * 78}\n# {name}\n{'#' * 78}")
        results[name], text = run(name, (["--quick"] if args.quick else []) + ["--out", args.out])
        if args.transcripts:
            os.makedirs(args.transcripts, exist_ok=True)
            with open(os.path.join(args.transcripts, name[:-3] + ".txt"), "w",
                      encoding="utf-8") as f:
                f.write(f"$ python examples/{name}\n{text}")
    return results


if __name__ == "__main__":
    main()
