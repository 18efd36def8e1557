"""Build the pymoe CUDA library, or its CPU emulation, from csrc/cuda/pymoe_cuda.cu.

From the repository root:
    python csrc/cuda/build.py                     nvcc -> pymoe/_pymoe_cuda.so (GPU library)
    python csrc/cuda/build.py --check             nvcc -c for sm_80 and sm_90, warnings shown
    python csrc/cuda/build.py --emulate -o PATH   g++ -> the CPU emulation the tests run
`PYMOE_BUILD_CUDA=1 pip install .` runs the first of these during the install.

Every build copies pymoe_cuda.h next to the library (same name, .h): the Python loader reads the
function declarations from there, so the header stays the one list of the API.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCE = os.path.join(HERE, "pymoe_cuda.cu")
HEADER = os.path.join(HERE, "pymoe_cuda.h")
DEFAULT_OUT = os.path.join(ROOT, "pymoe", "_pymoe_cuda.so")
ARCHS = ("80", "90")  # A100 and H100/H200; CUDA 13 has no sm_70


def gencode(archs=ARCHS) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags + ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX


def nvcc_command(out: str, compile_only: bool = False) -> list[str]:
    """nvcc, statically linked cudart (the library loads on machines without the toolkit).

    -fmad=false: no fused multiply-add, so products and sums round like the NumPy reference.
    """
    nvcc = os.environ.get("NVCC", "nvcc")
    cmd = [nvcc, "-O3", "-std=c++17", "-fmad=false", *gencode(), "-Xcompiler", "-fPIC,-Wall",
           f"-I{os.path.dirname(HERE)}", SOURCE, "-o", out]
    return cmd[:1] + ["-c"] + cmd[1:] if compile_only else cmd[:1] + ["-shared"] + cmd[1:]


def emulator_command(out: str, noop_barrier: bool = False) -> list[str]:
    """g++ (C++20) with the emulation shim; -ffp-contract=off for the same rounding as NumPy."""
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-shared", "-fPIC", "-Wall", "-Wextra",
           "-Wno-unknown-pragmas", "-ffp-contract=off", "-DPYMOE_EMULATE", "-x", "c++", f"-I{os.path.dirname(HERE)}",
           SOURCE, "-o", out]
    if noop_barrier:
        cmd.insert(1, "-DPYMOE_EMU_NOOP_BARRIER")
    return cmd


def header_for(lib: str) -> str:
    """Where the loader looks for the declarations of library `lib`."""
    return os.path.splitext(lib)[0] + ".h"


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a compiler; echo its command and whatever it printed (warnings included)."""
    print(" ".join(cmd), file=sys.stderr)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.stdout or res.stderr:
        print(res.stdout + res.stderr, file=sys.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed with exit code {res.returncode}:\n{res.stderr}")
    return res


def build(out: str = DEFAULT_OUT, emulate: bool = False, noop_barrier: bool = False) -> str:
    """Build the library at `out` and put its header beside it; returns the compiler's output."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    cmd = emulator_command(out, noop_barrier) if emulate else nvcc_command(out)
    res = run(cmd)
    shutil.copyfile(HEADER, header_for(out))
    return res.stdout + res.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=None, help=f"library path (default {DEFAULT_OUT})")
    ap.add_argument("--emulate", action="store_true", help="build the CPU emulation with g++")
    ap.add_argument("--noop-barrier", action="store_true",
                    help="with --emulate: make __syncthreads a no-op (to show tests catch it)")
    ap.add_argument("--check", action="store_true",
                    help="only compile (nvcc -c) for sm_80 and sm_90 and show the warnings")
    args = ap.parse_args(argv)
    if args.check:
        out = os.path.join(ROOT, "build", "cuda", "pymoe_cuda.o")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run(nvcc_command(out, compile_only=True))
        return 0
    out = args.out or DEFAULT_OUT
    build(out, emulate=args.emulate, noop_barrier=args.noop_barrier)
    print(f"built {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
