"""Smoke test of an installed pymoe, run from outside the checkout (.ci/packaging): it imports the
installed copy, the C core is there (and abi3), route + dispatch + combine agree with NumPy, and
`python -m pymoe.cuda_build --emulate` builds from the CUDA sources the package carries.

Usage: python smoke.py [--cuda-built]   (--cuda-built: the install was asked to build CUDA too)
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

import pymoe
from pymoe.backend import cuda_backend

here = os.path.dirname(pymoe.__file__)
assert "site-packages" in here, f"imported {here}, not the installed copy"
print("pymoe", pymoe.__version__, "from", here)
for info in pymoe.backends().values():
    print(" ", info)
info = pymoe.backends()["c"]
assert info.available, info.detail
assert any(name.endswith(".abi3.so") for name in os.listdir(here)), os.listdir(here)

rng = np.random.default_rng(0)
logits = rng.normal(size=(64, 8))
r = pymoe.route(logits, k=2, capacity_factor=1.25)
x = rng.normal(size=(64, 16)).astype(np.float32)
c, ref = pymoe.get_backend("c"), pymoe.get_backend("numpy")
np.testing.assert_array_equal(c.dispatch(x, r.slot_owner, 2), ref.dispatch(x, r.slot_owner, 2))
ys = [pymoe.MoELayer(16, 32, 8, 2, backend=b, seed=1).forward(x) for b in ("c", "numpy")]
np.testing.assert_allclose(ys[0], ys[1], rtol=1e-5, atol=1e-6)
print("route + dispatch + layer forward: C == NumPy")

cuda = pymoe.backends()["cuda"]
cuda_built = os.path.exists(os.path.join(here, "_pymoe_cuda.so"))
assert cuda_built or "--cuda-built" not in sys.argv, os.listdir(here)
if cuda_built:  # without a GPU it says so by name
    assert cuda.available or "no usable GPU" in cuda.detail or "no CUDA device" in cuda.detail, cuda
else:
    assert "python -m pymoe.cuda_build" in cuda.detail, cuda.detail
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "emu.so")
    subprocess.run([sys.executable, "-m", "pymoe.cuda_build", "--emulate", "-o", out], check=True)
    be, emu = cuda_backend.load(out)
    assert be is not None and be.emulated, emu.detail
print("python -m pymoe.cuda_build --emulate: built from the installed sources and loaded")
