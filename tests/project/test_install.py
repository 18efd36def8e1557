"""What a user sees when pymoe runs without its C core: the source-tree trap named at import and in
backends(), the warning silenced by PYMOE_DISABLE_C=1; and the CUDA build entry an installed
package has (`python -m pymoe.cuda_build`)."""
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, copy_package

# An editable install of pymoe in this venv (README's test command) maps pymoe._pymoe_c to its own
# tree whatever pymoe's folder is: drop that finder so the probe sees only the copy.
PROBE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
         "getattr(f, '__module__', '')]; import pymoe; print(pymoe.backends()['c'].detail)")


@pytest.fixture
def unbuilt_checkout(tmp_path):
    """A checkout's layout (setup.py, csrc/, pymoe/) with no compiled C core in it."""
    root = tmp_path / "checkout"
    copy_package(root)
    (root / "csrc").mkdir()
    shutil.copy(os.path.join(REPO, "setup.py"), root / "setup.py")
    return root


def _run(code, cwd, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("PYMOE_DISABLE_C", "PYTHONPATH")}
    full.update(env)
    # -c puts the current directory first on sys.path, as for a user at the repository root
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=120, check=False)


def test_source_tree_without_c_core_says_so(unbuilt_checkout):
    res = _run(PROBE, unbuilt_checkout)
    assert res.returncode == 0, res.stderr
    warning = [line for line in res.stderr.splitlines() if "CCoreMissingWarning" in line]
    assert len(warning) == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for text in (f"imported from the source tree {unbuilt_checkout}", "pip install -e .",
                 "PYMOE_DISABLE_C=1 silences this"):
        assert text in warning[0]
    assert f"source tree {unbuilt_checkout}" in res.stdout  # backends() gives the same reason


def test_source_tree_names_the_installed_copy(unbuilt_checkout, tmp_path):
    site = tmp_path / "site"
    (site / "pymoe").mkdir(parents=True)
    (site / "pymoe" / "__init__.py").write_text("")
    res = _run(PROBE, unbuilt_checkout, PYTHONPATH=str(site))
    assert res.returncode == 0, res.stderr
    assert f"the installed copy at {os.path.realpath(site / 'pymoe')} is not the one imported" \
        in res.stdout
    assert "run from another directory" in res.stdout


def test_disable_c_silences_the_warning(unbuilt_checkout):
    res = _run(PROBE, unbuilt_checkout, PYMOE_DISABLE_C="1")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.strip() == "disabled by PYMOE_DISABLE_C=1"


def test_no_warning_when_the_core_is_built(c_backend):
    res = _run("import pymoe", REPO)
    assert res.returncode == 0 and "CCoreMissingWarning" not in res.stderr, res.stderr


def test_cuda_build_entry_builds_a_loadable_library(tmp_path):
    """The entry an installed package offers runs the project's CUDA build (here the emulation,
    which needs g++ only) and the loader takes what it built."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no g++ for the CPU emulation of the CUDA kernels")
    from pymoe.backend import cuda_backend, cuda_build

    out = str(tmp_path / "emu.so")
    assert cuda_build.main(["--emulate", "-o", out]) == 0
    be, info = cuda_backend.load(out)
    assert be is not None and be.emulated, info.detail


def test_cuda_build_entry_reports_a_missing_compiler(tmp_path, monkeypatch, capsys):
    from pymoe.backend import cuda_build

    monkeypatch.setenv("NVCC", str(tmp_path / "no-nvcc"))
    assert cuda_build.main(["-o", str(tmp_path / "x.so")]) == 1
    err = capsys.readouterr().err
    assert "no-nvcc" in err and "needs nvcc ($NVCC) on PATH" in err
