"""Build script: the Python package plus the optional C core (cffi, API mode).

Environment variables:
    PYMOE_REQUIRE_C=1   a failed C build fails the install (CI sets it); otherwise the install
                        succeeds without it and pymoe.backends() shows the compiler's error.
    PYMOE_SANITIZE=1    build the C core with ASan + UBSan (see csrc/build_cffi.py).
    PYMOE_OPENMP=0      build the C core without OpenMP.
    PYMOE_BUILD_CUDA=1  also build the CUDA library with nvcc (csrc/cuda/build.py) into the
                        package; a failed CUDA build then fails the install.
"""
import importlib.util
import os

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

STATUS_FILE = "_c_build_status.txt"  # written next to the extension when its build fails


def build_cuda_library(package_dir):
    """nvcc -> package_dir/_pymoe_cuda.so (+ its header), by csrc/cuda/build.py."""
    spec = importlib.util.spec_from_file_location("pymoe_cuda_build",
                                                  os.path.join("csrc", "cuda", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build(os.path.join(package_dir, "_pymoe_cuda.so"))


class OptionalBuildExt(build_ext):
    """Build the C core if the machine can; otherwise record why, for pymoe.backends().
    With PYMOE_BUILD_CUDA=1, also build the CUDA library next to it."""

    def run(self):
        super().run()
        if os.environ.get("PYMOE_BUILD_CUDA") == "1":
            build_cuda_library(os.path.dirname(self.get_ext_fullpath("pymoe._pymoe_c")))

    def build_extension(self, ext):
        # Where pymoe will look for the status: next to the built library (wheels) and in the
        # source package (editable and --inplace builds, which build elsewhere and copy back).
        package_dir = self.get_finalized_command("build_py").get_package_dir("pymoe")
        paths = {os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), STATUS_FILE),
                 os.path.join(package_dir, STATUS_FILE)}
        # optional: setuptools then skips copying a missing library into the source tree
        # instead of failing the install after all.
        ext.optional = os.environ.get("PYMOE_REQUIRE_C") != "1"
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, LinkError, ExecError, PlatformError, OSError) as err:
            if not ext.optional:
                raise
            for path in paths:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(f"the C extension failed to build at install time: {err}\n")
            self.warn(f"building the pymoe C core failed ({err}); the NumPy backend still works")
        else:
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)


setup(
    name="pymoe",
    version="0.1.0",
    description="Mixture-of-Experts token routing, step by step in NumPy, with C and CUDA fast paths",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["pymoe", "pymoe.*"]),
    install_requires=["numpy>=1.22", "cffi>=1.15"],
    extras_require={
        # pictures of routing (pymoe.viz, examples, bench --plot); text fallbacks without it
        "viz": ["matplotlib>=3.6"],
        # everything the example scripts can use: the digits data set and a progress bar
        "examples": ["matplotlib>=3.6", "scikit-learn>=1.0", "tqdm>=4"],
        # expert parallelism over MPI (pymoe.expert_parallel): mpi4py needs an MPI library, and
        # the MPICH wheel brings one (with mpiexec) without system packages
        "mpi": ["mpi4py>=3.1", "mpich"],
        # device arrays for the CUDA backend (CUDA 13 wheels)
        "cuda": ["cupy-cuda13x"],
        # the cross-checks against other systems' own routing code (tests/test_crosscheck_*.py;
        # install deepspeed with DS_BUILD_OPS=0 on machines without CUDA)
        "crosscheck": ["torch>=2.4", "transformers>=5.0", "deepspeed>=0.16",
                       "megatron-core==0.16.1"],
        # the test suite, including the examples' --quick runs with their plots
        "test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.6", "scikit-learn>=1.0",
                 "tqdm>=4", "nbformat>=5", "nbclient>=0.7", "ipykernel>=6"],
    },
    cffi_modules=["csrc/build_cffi.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
