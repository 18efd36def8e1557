"""Run every example in reading order and put their pictures in one folder.

    python examples/run_all.py --out docs/img      # regenerates the pictures README shows
    python examples/run_all.py --quick             # all four in CI-sized form

Each example is also runnable on its own (python examples/01_walkthrough.py, ...).
"""
from __future__ import annotations

import argparse
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = ["00_why.py", "01_walkthrough.py", "01b_backward.py", "02_capacity.py", "03_train.py",
            "04_speed.py"]


def load(name: str):
    """Import an example module from its file (the names start with digits)."""
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(HERE, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="pymoe-out")
    args = ap.parse_args(argv)
    results = {}
    for name in EXAMPLES:
        print(f"\n{'#' * 78}\n# {name}\n{'#' * 78}")
        results[name] = load(name).main((["--quick"] if args.quick else []) + ["--out", args.out])
    return results


if __name__ == "__main__":
    main()
