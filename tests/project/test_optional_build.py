"""Without a working C compiler the build still succeeds, NumPy runs, and the reason shows; with
PYMOE_REQUIRE_C=1 the same build fails loudly.

The builds run `setup.py build_ext --inplace` with this venv's own setuptools: the test extra
carries the build requirements (pyproject.toml), so that holds on every supported Python (3.12+
venvs start without setuptools, 3.9's start with setuptools 58).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, copy_package


def _missing_build_tools() -> str | None:
    """Why this venv cannot run setup.py (no or too old setuptools, no cffi), or None."""
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        floor = int(re.search(r'"setuptools>=(\d+)', f.read()).group(1))
    if importlib.util.find_spec("cffi") is None or importlib.util.find_spec("setuptools") is None:
        return "setuptools or cffi is not installed"
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < floor:
        return f"setuptools {setuptools.__version__} is older than the build floor {floor}"
    return None


_MISSING = _missing_build_tools()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}: install the test extra "
                                "(pip install -e '.[test]'), which carries the build tools")


@pytest.fixture
def source_copy(tmp_path):
    """The package sources in a scratch folder (so the in-place build here is not touched)."""
    dst = tmp_path / "src"
    copy_package(dst)
    shutil.copytree(os.path.join(REPO, "csrc"), dst / "csrc")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(REPO, name), dst / name)
    return dst


def _build(src, **env_changes):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYMOE_REQUIRE_C", "PYMOE_BUILD_CUDA", "PYMOE_SANITIZE")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                          env=env, capture_output=True, text=True, timeout=300)


def test_broken_compiler_still_installs_and_says_why(source_copy):
    res = _build(source_copy, CC="/nonexistent/cc")
    assert res.returncode == 0, res.stderr
    status = source_copy / "pymoe" / "_c_build_status.txt"
    assert status.exists() and "failed to build" in status.read_text()
    assert not list((source_copy / "pymoe").glob("_pymoe_c*.so"))
    # An editable install of pymoe in this venv would resolve pymoe._pymoe_c to its own tree:
    # drop that finder so the probe sees only the copy.
    probe = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
             "getattr(f, '__module__', '')]; "
             "import pymoe, numpy as np; info = pymoe.backends()['c']; print(info.available, "
             "info.detail); layer = pymoe.MoELayer(4, 4, 2, 1); print(layer.backend.name); "
             "print(layer.forward(np.ones((3, 4), np.float32)).shape)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=source_copy, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(source_copy)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("False the C extension failed to build at install time")
    assert "/nonexistent/cc" in lines[0]
    assert lines[1:] == ["numpy", "(3, 4)"]


def test_required_c_build_fails_loudly(source_copy):
    res = _build(source_copy, CC="/nonexistent/cc", PYMOE_REQUIRE_C="1")
    assert res.returncode != 0
    # failed for the compiler, not for a missing build tool
    assert "/nonexistent/cc" in res.stdout + res.stderr, res.stdout + res.stderr
    assert not (source_copy / "pymoe" / "_c_build_status.txt").exists()
