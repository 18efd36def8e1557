"""Build script for what pyproject.toml cannot say: the optional C core (cffi, API mode), the
optional CUDA library, the CUDA sources shipped for `python -m pymoe.cuda_build`, and a wheel tag
that matches what was built. The metadata lives in pyproject.toml.

Environment variables:
    PYMOE_REQUIRE_C=1   a failed C build fails the install (CI sets it); otherwise the install
                        succeeds without it and pymoe.backends() shows the compiler's error.
    PYMOE_SANITIZE=1    build the C core with ASan + UBSan (see csrc/build_cffi.py).
    PYMOE_OPENMP=0      build the C core without OpenMP.
    PYMOE_BUILD_CUDA=1  also build the CUDA library with nvcc (csrc/cuda/build.py) into the
                        package; a failed CUDA build then fails the install.
"""
import glob
import importlib.util
import os
import re
import shutil

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

STATUS_FILE = "_c_build_status.txt"  # written next to the extension when its build fails
# What `python -m pymoe.cuda_build` needs inside an installed package: the CUDA sources, their
# build script and the C files they include (csrc/cuda/pymoe_cuda.cu includes ../internal.h and
# ../errors.c, the C core's error messages).
# They keep their csrc/ layout under pymoe/_csrc/ so that build.py's relative paths still hold.
CUDA_SOURCES = ["internal.h", "pymoe.h", "errors.c", "cuda/*.py", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h",
                "cuda/emu/*.h", "cuda/emu/*.cpp"]


def package_page_readme(path="README.md"):
    """README.md for the package index page: relative links cannot resolve there (there is no
    public repository to point at), so each picture becomes its path in the sdist and each
    relative link its text with the path."""
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def picture(match):
        return f"*(picture: `{match.group(1)}` in the source distribution)*"

    text = re.sub(r'<img src="([^":]+)"[^>]*>', picture, text)
    text = re.sub(r"!\[[^\]]*\]\(([^):]+)\)", picture, text)
    return re.sub(r"\[([^\]]+)\]\(((?!#)[^):]+)\)", r"\1 (`\2` in the source distribution)", text)


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


class BuildPyWithCudaSources(build_py):
    """Copy the CUDA sources into the built package (pymoe/_csrc/), for installed builds."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install builds from csrc/ itself
            return
        for pattern in CUDA_SOURCES:
            for src in sorted(glob.glob(os.path.join("csrc", pattern))):
                dst = os.path.join(self.build_lib, "pymoe", "_csrc", os.path.relpath(src, "csrc"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)


class TaggedWheel(bdist_wheel):
    """Tag the wheel for what it holds: cp39-abi3 when the C core was built for the stable ABI
    (cffi builds it so: the library is named *.abi3.so), py3-none-any when nothing compiled was
    built (a failed optional C build and no CUDA library)."""

    def get_tag(self):
        package = os.path.join(self.bdist_dir, "pymoe")
        core = glob.glob(os.path.join(package, "_pymoe_c.*so"))
        cuda = glob.glob(os.path.join(package, "_pymoe_cuda.so"))
        if not core and not cuda:
            self.root_is_pure = True  # files sit at the archive root either way
        elif core and all(path.endswith(".abi3.so") for path in core):
            self.py_limited_api = "cp39"  # requires-python's floor
        return super().get_tag()


setup(
    long_description=package_page_readme(),
    long_description_content_type="text/markdown",
    cffi_modules=["csrc/build_cffi.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithCudaSources,
              "bdist_wheel": TaggedWheel},
)
