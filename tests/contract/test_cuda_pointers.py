"""The CUDA wrapper names a NULL device pointer's argument (regression)."""
from __future__ import annotations

import numpy as np
import pytest


# ------------------------------------------------------------------ CUDA wrapper
def test_cuda_null_device_pointer_names_the_argument(cuda_emulator_path):
    from pymoe.backend import cuda_backend
    from pymoe.backend.cuda_backend import DeviceArray

    be, info = cuda_backend.load(cuda_emulator_path)
    assert be is not None, info.detail
    owner = np.zeros((1, 1), np.int64)
    with pytest.raises(ValueError, match=r"^x: got a NULL device pointer"):
        be.dispatch(DeviceArray(0, (2, 3), np.float32), owner, 1)
    with pytest.raises(ValueError, match=r"^out: got a NULL device pointer"):
        be.dispatch(np.ones((2, 3), np.float32), owner, 1, out=DeviceArray(0, (1, 1, 3)))
    be.dispatch(DeviceArray(0, (0, 3), np.float32), np.full((1, 1), -1), 1)  # empty: fine
