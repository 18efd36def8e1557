"""Each SIMD clone of the expert epilogues, built alone (csrc/internal.h: -DPYMOE_SIMD_ONLY=...),
gives pymoe.expert_forms' bits: a default build runs only the clone this CPU picks, so the others
(baseline x86-64, AVX2, AVX-512) are rebuilt here in a copy of the sources, and the epilogue tests
run in a child Python on that copy."""
import os
import platform
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, copy_package


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {w for ln in f if ln.startswith("flags") for w in ln.split(":", 1)[1].split()}
    except OSError:
        return set()


TARGETS = {"arch=x86-64": None, "avx2": "avx2", "avx512f": "avx512f"}  # target -> CPU flag


@pytest.mark.parametrize("target", list(TARGETS))
def test_each_clone_gives_the_numpy_bits(target, tmp_path):
    if platform.machine() != "x86_64" or sys.platform != "linux" or not shutil.which("gcc"):
        pytest.skip("the clones are built for x86-64 Linux with GCC only")
    if not os.path.exists(os.path.join(REPO, "csrc", "internal.h")):
        pytest.skip("needs the source tree (csrc/), not an installed copy")
    flag = TARGETS[target]
    if flag and flag not in cpu_flags():
        pytest.skip(f"this CPU has no {flag}: its clone cannot run here")
    copy_package(tmp_path)
    shutil.copytree(os.path.join(REPO, "csrc"), tmp_path / "csrc",
                    ignore=shutil.ignore_patterns("cuda"))
    for name in ("setup.py", "pyproject.toml", "README.md"):  # setup.py reads the other two
        shutil.copy(os.path.join(REPO, name), tmp_path)
    env = dict(os.environ, CFLAGS=f"-DPYMOE_SIMD_ONLY={target}", PYMOE_BUILD_CUDA="0")
    env.pop("PYMOE_SANITIZE", None)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=False)
    assert f"-DPYMOE_SIMD_ONLY={target}" in build.stdout + build.stderr  # reached the compiler
    assert build.returncode == 0, build.stdout + build.stderr
    tests = [os.path.join(REPO, "tests", "backend", f) for f in
             ("test_form_epilogues.py", "test_epilogues.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-W", "error::pymoe.backend.install.CCoreMissingWarning", *tests],
                         cwd=tmp_path, env=dict(env, PYTHONPATH=str(tmp_path)),
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
