"""Build the CUDA library into this pymoe installation: `python -m pymoe.cuda_build`
(or the `pymoe-cuda-build` script).

It runs the project's CUDA build (csrc/cuda/build.py, `build(out, emulate=...)`): from the checkout
when pymoe is imported from one, else from the copy of the CUDA sources that the wheel carries in
pymoe/_csrc/. The library lands where pymoe.cuda_backend looks for it (pymoe/_pymoe_cuda.so),
or at `--out PATH`, which PYMOE_CUDA_LIB=PATH then points the loader at.
Needs nvcc (the CUDA toolkit; $NVCC overrides) or, with --emulate, g++ for the CPU emulation.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from types import ModuleType

from .. import _checks

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pymoe/
DEFAULT_OUT = os.path.join(PACKAGE_DIR, "_pymoe_cuda.so")


def build_script() -> str:
    """Path of csrc/cuda/build.py: in the checkout, or shipped inside the installed package."""
    for csrc in (os.path.join(os.path.dirname(PACKAGE_DIR), "csrc"),
                 os.path.join(PACKAGE_DIR, "_csrc")):
        path = os.path.join(csrc, "cuda", "build.py")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"the CUDA sources are neither in a checkout next to {PACKAGE_DIR} nor in "
        f"{os.path.join(PACKAGE_DIR, '_csrc')} (this installation was built without them); "
        "reinstall from the source distribution: pip install --no-binary pymoe-routing pymoe-routing")


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("pymoe_cuda_build_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(out: str = DEFAULT_OUT, emulate: bool = False) -> str:
    """Build the CUDA library (or, with emulate, its CPU emulation) at `out`; returns `out`."""
    _load(build_script()).build(out, emulate=emulate)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pymoe.cuda_build",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-o", "--out", default=DEFAULT_OUT,
                    help=f"library path (default {DEFAULT_OUT}); elsewhere, set PYMOE_CUDA_LIB to it")
    ap.add_argument("--emulate", action="store_true",
                    help="build the CPU emulation of the kernels with g++ (for tests, no GPU)")
    args = ap.parse_args(argv)
    try:
        _checks.output_path("--out", args.out)
    except (TypeError, ValueError) as err:
        ap.error(f"argument {err}")
    compiler = "g++ ($CXX)" if args.emulate else "nvcc ($NVCC)"
    try:
        out = build(os.path.abspath(args.out), emulate=args.emulate)
    except FileNotFoundError as err:  # no compiler on PATH, or no sources
        print(f"pymoe.cuda_build: {err}\n(the build needs {compiler} on PATH)", file=sys.stderr)
        return 1
    except PermissionError as err:
        print(f"pymoe.cuda_build: {err}; build elsewhere with --out PATH and set "
              "PYMOE_CUDA_LIB=PATH", file=sys.stderr)
        return 1
    except RuntimeError as err:  # the compiler failed; build.py printed its output
        print(f"pymoe.cuda_build: {err}", file=sys.stderr)
        return 1
    hint = "" if out == DEFAULT_OUT else f" (set PYMOE_CUDA_LIB={out} to use it)"
    print(f"built {out}{hint}; check it with: python -c \"import pymoe; "
          "print(pymoe.backends()['cuda'])\"", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
