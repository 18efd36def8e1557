"""cffi API-mode builder for the pymoe C core (pymoe._pymoe_c).

setup.py wires it in through `cffi_modules`; it also runs on its own from the repository root
(`python csrc/build_cffi.py`) to build the extension next to the sources for quick experiments.

Environment:
    PYMOE_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer build (-O1 -g); run Python
                       with LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0
    PYMOE_OPENMP=0     build without OpenMP (it is used when the compiler accepts -fopenmp)
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCES = ["errors.c", "slots.c", "threads.c", "ops_f32.c", "ops_f64.c"]
# a change to any of these rebuilds the core
HEADERS = ["pymoe.h", "internal.h", "moe_ops.h", "topk_ops.h", "expert_ops.h", "expert_forms.h"]


def header_cdef() -> str:
    """The declarations between the cdef markers of pymoe.h, its float-operation macros expanded
    (pymoe/backend/cdef_macros.py, loaded by path: the package is not importable while it is built)."""
    path = os.path.join(ROOT, "pymoe", "backend", "cdef_macros.py")
    spec = importlib.util.spec_from_file_location("pymoe_cdef", path)
    cdef = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cdef)
    return cdef.cdef_block(os.path.join(HERE, "pymoe.h"))


def compiler_accepts(flag: str) -> bool:
    """Whether the C compiler builds and links a tiny OpenMP program with `flag`."""
    cc = os.environ.get("CC", "cc").split()
    if not shutil.which(cc[0]):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
        res = subprocess.run(cc + [flag, src, "-o", os.path.join(tmp, "t")],
                             capture_output=True, check=False)
        return res.returncode == 0


def build_flags() -> tuple[list[str], list[str], str]:
    """(compile args, link args, a one-line description of the build)."""
    # -ffp-contract=off: no fused multiply-add, so C rounds exactly like the NumPy reference.
    # -fno-trapping-math: no FP traps are watched, so GCC may if-convert and vectorise the expert
    # epilogues (every value stays the IEEE one; tests/backend/test_form_epilogues.py checks bits).
    cflags = ["-std=c99", "-ffp-contract=off", "-fno-trapping-math", "-Wall", "-Wextra"]
    lflags: list[str] = []
    if os.environ.get("PYMOE_SANITIZE") == "1":
        # Python's CFLAGS contain -fwrapv, which hides signed overflow from UBSan: undo it.
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        cflags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-wrapv", "-DPYMOE_SANITIZE"] + san
        lflags += san
        mode = "ASan+UBSan -O1"
    else:
        cflags += ["-O3"]
        mode = "-O3"
    if os.environ.get("PYMOE_OPENMP", "1") != "0" and compiler_accepts("-fopenmp"):
        cflags.append("-fopenmp")
        lflags.append("-fopenmp")
        mode += ", OpenMP"
    else:
        mode += ", no OpenMP"
    return cflags, lflags, mode


CFLAGS, LFLAGS, BUILD_MODE = build_flags()

ffibuilder = FFI()
ffibuilder.cdef(header_cdef() + "\nconst char *pymoe_build_config(void);\n")
ffibuilder.set_source(
    "pymoe._pymoe_c",
    '#include "pymoe.h"\n'
    f'static const char *pymoe_build_config(void) {{ return "{BUILD_MODE}"; }}\n',
    # Paths relative to setup.py, as setuptools wants them.
    sources=[os.path.join("csrc", s) for s in SOURCES],
    include_dirs=["csrc"],
    depends=[os.path.join("csrc", h) for h in HEADERS],
    extra_compile_args=CFLAGS,
    extra_link_args=LFLAGS,
)

if __name__ == "__main__":
    os.chdir(ROOT)
    out = ffibuilder.compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=True)
    dest = os.path.join(ROOT, "pymoe", os.path.basename(out))
    shutil.copy(out, dest)
    print(f"built {dest} ({BUILD_MODE})", file=sys.stderr)
