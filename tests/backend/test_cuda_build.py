"""nvcc builds the kernels; the loader fails cleanly, naming the reason, without a GPU."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, cuda_build_module, gpu_visible
from pymoe.backend import cuda_backend

NVCC = os.environ.get("NVCC", "nvcc")
needs_nvcc = pytest.mark.skipif(shutil.which(NVCC) is None, reason=f"{NVCC} not found")


@needs_nvcc
def test_nvcc_compiles_for_sm80_and_sm90_without_warnings_or_spills():
    """build.py --check's compile: no warning, every kernel on both archs in the ptxas table, no
    spill, and every kernel fits at least one 256-thread block per SM (the resource table is
    printed, as CI prints it)."""
    build = cuda_build_module()
    rows, output = build.check()
    print(build.resource_table(rows))  # shown with pytest -s / -rA
    assert "sm_80" in " ".join(build.gencode()) and "sm_90" in " ".join(build.gencode())
    assert "warning" not in output.lower(), output
    kernels = {r.kernel.split("<")[0].replace("void ", "") for r in rows}
    assert {"softmax_top_k_kernel", "top_k_kernel", "column_sum_kernel", "slots_count_kernel",
            "slots_scan_kernel", "slots_scatter_kernel", "keep_by_score_kernel", "dispatch_kernel",
            "combine_kernel", "gate_grad_kernel"} <= kernels
    assert {r.arch for r in rows} == {"80", "90"}
    assert not [(r.kernel, r.arch, r.spill_bytes) for r in rows if r.spill_bytes]
    assert all(r.blocks_per_sm() >= 1 for r in rows)


def test_resource_table_parser():
    """The ptxas -v lines the table is built from (format of CUDA 13), parsed and turned into an
    occupancy: 40 registers -> 1280 per warp -> 51 warps -> 6 blocks of 8 warps on sm_90."""
    build = cuda_build_module()
    out = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 9216 bytes smem, 400 bytes cmem[0]\n")
    (row,) = build.parse_ptxas(out)
    assert (row.arch, row.registers, row.spill_bytes, row.stack_bytes, row.static_smem) == \
        ("90", 40, 8, 8, 9216)
    assert row.blocks_per_sm() == 6 and row.occupancy() == 0.75
    assert "| sm_90 | 40 | 8 | 8 | 9216 | 6 | 75% |" in build.resource_table([row])


@pytest.fixture(scope="module")
def real_library(tmp_path_factory):
    if shutil.which(NVCC) is None:
        pytest.skip(f"{NVCC} not found")
    path = str(tmp_path_factory.mktemp("cuda_real") / "pymoe_cuda.so")
    cuda_build_module().build(path)
    return path


def test_without_a_gpu_the_backend_says_why(real_library):
    """Import works, backends() names the CUDA error, asking for it raises with that name, and
    nothing hangs (a subprocess with a deadline)."""
    visible, _ = gpu_visible()
    if visible:
        pytest.skip("a GPU is visible here: the no-GPU path cannot be observed")
    script = textwrap.dedent("""
        import pymoe
        info = pymoe.backends()["cuda"]
        print("INFO", info.available, info.detail)
        try:
            pymoe.get_backend("cuda")
        except RuntimeError as err:
            print("RAISED", err)
    """)
    env = dict(os.environ, PYMOE_CUDA_LIB=real_library)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "INFO False no usable GPU: cudaGetDeviceCount failed with cudaError" in res.stdout
    assert "RAISED backend 'cuda' is not available: no usable GPU" in res.stdout
    name = res.stdout.split("failed with ")[1].split()[0]
    assert name in ("cudaErrorInsufficientDriver", "cudaErrorNoDevice"), res.stdout


def test_missing_library(tmp_path):
    be, info = cuda_backend.load(str(tmp_path / "absent.so"))
    assert be is None and "is not built" in info.detail and "python -m pymoe.cuda_build" in info.detail


def test_fake_library(tmp_path):
    fake = tmp_path / "fake.so"
    fake.write_text("not a shared library")
    shutil.copyfile(os.path.join(REPO, "csrc", "cuda", "pymoe_cuda.h"), tmp_path / "fake.h")
    be, info = cuda_backend.load(str(fake))
    assert be is None and info.detail.startswith(f"cannot load the CUDA library {fake}")


def test_library_without_its_header(tmp_path, cuda_emulator_path):
    lib = tmp_path / "lonely.so"
    shutil.copyfile(cuda_emulator_path, lib)
    be, info = cuda_backend.load(str(lib))
    assert be is None and "cannot load" in info.detail and "lonely.h" in info.detail


def test_layer_refuses_the_cuda_backend():
    import pymoe

    with pytest.raises(ValueError, match="MoELayer computes on host"):
        pymoe.MoELayer(4, 4, 2, 1, backend="cuda")


def test_pip_built_the_cuda_library_when_asked():
    """CI installs with PYMOE_BUILD_CUDA=1: the library and its header are in the package."""
    if os.environ.get("PYMOE_BUILD_CUDA") != "1":
        pytest.skip("this install did not ask for the CUDA build (PYMOE_BUILD_CUDA=1)")
    path = os.path.join(cuda_backend.PACKAGE_DIR, "_pymoe_cuda.so")  # pymoe/, beside _pymoe_c
    assert os.path.exists(path) and os.path.exists(path[:-3] + ".h")
    be, info = cuda_backend.load(path)
    assert be is not None or "no usable GPU" in info.detail or "no CUDA device" in info.detail
