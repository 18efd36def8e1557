"""A MoELayer pickles and deep-copies, its backend re-resolved on loading (regression)."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from helpers import assert_same_bits, backend_by_name
from helpers import small_layer as layer


# ------------------------------------------------------------------ pickling
@pytest.mark.parametrize("backend", ["auto", "numpy", "c"])
def test_layer_pickles_and_deepcopies(backend, request):
    backend_by_name(backend, request)  # "c": skips or fails where the C core is not built
    m = layer(backend=backend)
    x = np.random.default_rng(4).normal(size=(5, 6)).astype(np.float32)
    y = m.forward(x)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert clone.backend.name == m.backend.name
        assert_same_bits(clone.forward(x), y)
        assert_same_bits(clone.backward(np.ones_like(x)), m.backward(np.ones_like(x)))
        clone.params["w1"][...] = 0  # a real copy: the original is untouched
        assert np.any(m.params["w1"])
