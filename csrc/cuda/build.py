"""Build the pymoe CUDA library, or its CPU emulation, from csrc/cuda/pymoe_cuda.cu.

From the repository root:
    python csrc/cuda/build.py                     nvcc -> pymoe/_pymoe_cuda.so (GPU library)
    python csrc/cuda/build.py --check             nvcc -c -Xptxas -v for sm_80 and sm_90: warnings
                                                  and the resource table (registers, spills,
                                                  shared memory, occupancy at the launch shape);
                                                  exit 1 on a warning or a spill
    python csrc/cuda/build.py --emulate -o PATH   g++ -> the CPU emulation the tests run
`PYMOE_BUILD_CUDA=1 pip install .` runs the first of these during the install.

Every build copies pymoe_cuda.h next to the library (same name, .h): the Python loader reads the
function declarations from there, so the header stays the one list of the API.
"""
from __future__ import annotations

import argparse
import os
import re
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


def nvcc_command(out: str, compile_only: bool = False, verbose: bool = False) -> list[str]:
    """nvcc, statically linked cudart (the library loads on machines without the toolkit).

    -fmad=false: no fused multiply-add, so products and sums round like the NumPy reference.
    verbose: -Xptxas -v, ptxas's registers / spills / shared memory per kernel and arch.
    """
    nvcc = os.environ.get("NVCC", "nvcc")
    cmd = [nvcc, "-O3", "-std=c++17", "-fmad=false", *gencode(), "-Xcompiler", "-fPIC,-Wall",
           *(["-Xptxas", "-v"] if verbose else []), f"-I{os.path.dirname(HERE)}", SOURCE, "-o",
           out]
    return cmd[:1] + ["-c"] + cmd[1:] if compile_only else cmd[:1] + ["-shared"] + cmd[1:]


# ------------------------------------------------------------------ resource table
# Per-SM limits (CUDA C Programming Guide, "Compute Capabilities" table): registers, threads,
# resident blocks, shared memory (the most a block may use is 1 KB less: the system reserve).
SM_LIMITS = {"80": dict(regs=65536, threads=2048, blocks=32, smem=167936),
             "90": dict(regs=65536, threads=2048, blocks=32, smem=233472)}
BLOCK = 256  # the default launch shape: 256 threads per block
SLOT_E = 64  # experts at which the slot kernels' dynamic shared memory is counted


class KernelResources:
    """One kernel on one arch, as ptxas -v reports it. (A plain class: this file is also loaded
    by path, outside sys.modules, where dataclasses cannot resolve string annotations.)"""

    def __init__(self, kernel: str, arch: str, registers: int, spill_bytes: int,
                 stack_bytes: int, static_smem: int) -> None:
        self.kernel, self.arch, self.registers = kernel, arch, registers
        self.spill_bytes = spill_bytes  # spill stores + loads
        self.stack_bytes, self.static_smem = stack_bytes, static_smem

    def launch_smem(self) -> int:
        """Shared memory per block at the launch shape (static + dynamic)."""
        if self.kernel.startswith(("slots_count_kernel", "slots_scatter_kernel")):
            return self.static_smem + (BLOCK // 32) * SLOT_E * 4
        return self.static_smem

    def blocks_per_sm(self) -> int:
        lim = SM_LIMITS[self.arch]
        per_warp = -(-max(self.registers, 1) * 32 // 256) * 256  # allocated per warp, 256 at a time
        by_regs = (lim["regs"] // per_warp) // (BLOCK // 32)
        smem = self.launch_smem() + 1024  # the per-block system reserve
        by_smem = lim["smem"] // smem
        return min(lim["blocks"], lim["threads"] // BLOCK, by_regs, by_smem)

    def occupancy(self) -> float:
        return self.blocks_per_sm() * BLOCK / SM_LIMITS[self.arch]["threads"]


def parse_ptxas(output: str) -> list[KernelResources]:
    """The per-kernel lines of `ptxas -v` output, demangled (c++filt when present)."""
    rows, current = [], None
    stack = spill = 0
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            current, stack, spill = (m.group(1), m.group(2)), 0, 0
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and current:
            stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append(KernelResources(current[0], current[1], int(m.group(1)), spill, stack,
                                        int(smem.group(1)) if smem else 0))
            current = None
    names = _demangle([r.kernel for r in rows])
    for r, n in zip(rows, names):
        r.kernel = n.split("(")[0]
    return sorted(rows, key=lambda r: (r.kernel, r.arch))


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=False)
    out = res.stdout.splitlines()
    return out if res.returncode == 0 and len(out) == len(names) else names


def resource_table(rows: list[KernelResources]) -> str:
    """A Markdown table: what ptxas reports, and the occupancy those figures allow."""
    head = (f"| kernel | arch | registers | spills (B) | stack (B) | smem/block at launch (B) | "
            f"blocks/SM at {BLOCK} threads | occupancy |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| `{r.kernel}` | sm_{r.arch} | {r.registers} | {r.spill_bytes} | "
                     f"{r.stack_bytes} | {r.launch_smem()} | {r.blocks_per_sm()} | "
                     f"{r.occupancy():.0%} |")
    return "\n".join(lines)


def check() -> tuple[list[KernelResources], str]:
    """Compile for sm_80 and sm_90 with ptxas -v; returns (rows, compiler output)."""
    out = os.path.join(ROOT, "build", "cuda", "pymoe_cuda.o")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    res = run(nvcc_command(out, compile_only=True, verbose=True), echo=False)
    output = res.stdout + res.stderr
    return parse_ptxas(output), output


def emulator_command(out: str, noop_barrier: bool = False) -> list[str]:
    """g++ (C++20) with the emulation shim; -ffp-contract=off for the same rounding as NumPy.
    -fno-gnu-unique: the shim's inline statics (emu::state, each kernel's __shared__ arrays) stay
    this library's own; as STB_GNU_UNIQUE symbols, two emulations loaded in one process (the
    tests' normal one and the no-barrier one) would share them, and each corrupt the other."""
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-shared", "-fPIC", "-Wall", "-Wextra",
           "-Wno-unknown-pragmas", "-ffp-contract=off", "-fno-gnu-unique", "-DPYMOE_EMULATE",
           "-x", "c++",
           f"-I{os.path.dirname(HERE)}",
           SOURCE, "-o", out]
    if noop_barrier:
        cmd.insert(1, "-DPYMOE_EMU_NOOP_BARRIER")
    return cmd


def header_for(lib: str) -> str:
    """Where the loader looks for the declarations of library `lib`."""
    return os.path.splitext(lib)[0] + ".h"


def run(cmd: list[str], echo: bool = True) -> subprocess.CompletedProcess:
    """Run a compiler; echo its command and (echo) whatever it printed (warnings included)."""
    print(" ".join(cmd), file=sys.stderr)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if echo and (res.stdout or res.stderr):
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
                    help="only compile (nvcc -c) for sm_80 and sm_90; print the warnings and the "
                         "resource table; fail on a warning or a spill")
    ap.add_argument("--table", metavar="PATH",
                    help="with --check: also write the resource table to PATH (Markdown)")
    args = ap.parse_args(argv)
    if args.check:
        rows, output = check()
        warnings = [ln for ln in output.splitlines() if "warning" in ln.lower()]
        print("\n".join(warnings) if warnings else "no compiler warnings")
        print(f"ptxas resources (from -Xptxas -v; occupancy computed from them for {BLOCK}-thread "
              f"blocks, slot kernels at E={SLOT_E}; nothing measured on a GPU):")
        print(resource_table(rows))
        if args.table:
            with open(args.table, "w", encoding="utf-8") as f:
                f.write(f"# CUDA kernel resources\n\nWritten by `python csrc/cuda/build.py --check "
                        f"--table {args.table}` from `nvcc -Xptxas -v` (CUDA 13) for sm_80 and "
                        f"sm_90. Registers, spills, stack and shared memory are what ptxas "
                        f"reports; blocks per SM and occupancy are computed from them for "
                        f"{BLOCK}-thread blocks (slot kernels at E={SLOT_E}) with each arch's "
                        f"per-SM limits. Nothing here was measured on a GPU.\n\n"
                        f"{resource_table(rows)}\n")
        spills = [r for r in rows if r.spill_bytes]
        for r in spills:
            print(f"SPILL: {r.kernel} sm_{r.arch}: {r.spill_bytes} bytes")
        return 1 if warnings or spills or not rows else 0
    out = args.out or DEFAULT_OUT
    build(out, emulate=args.emulate, noop_barrier=args.noop_barrier)
    print(f"built {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
