"""pymoe.hf.load_balancing_loss against transformers' own load_balancing_loss_func, and the
NumPy safetensors reader against the safetensors package."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import import_optional

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

import pymoe.hf  # noqa: E402
from pymoe.hf import safetensors as st  # noqa: E402


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layers,E,K", [(1, 8, 2), (3, 16, 4), (2, 4, 1)])
def test_load_balancing_loss_is_hfs(layers, E, K, masked):
    rng = np.random.default_rng(layers * 100 + E + K)
    B, S = 3, 10
    logits = [rng.normal(0, 2, (B * S, E)).astype(np.float32) for _ in range(layers)]
    mask = (rng.random((B, S)) < 0.7).astype(np.int64) if masked else None
    theirs = float(load_balancing_loss_func(tuple(torch.from_numpy(a) for a in logits), E, K,
                                            None if mask is None else torch.from_numpy(mask)))
    ours = pymoe.hf.load_balancing_loss(logits, E, K, mask)
    # HF sums in float32 over L*T rows: a few float32 ulps of the O(K) value
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_load_balancing_loss_pools_layers():
    """Pooling: two layers each balanced to one expert in opposite ways score as one balanced
    pooled layer, not as the mean of two collapsed ones."""
    E = 2
    a = np.array([[5.0, -5.0]] * 4)
    pooled = pymoe.hf.load_balancing_loss([a, a[:, ::-1].copy()], E, 1)
    one = pymoe.hf.load_balancing_loss([a], E, 1)
    assert pooled < one
    assert pooled == pytest.approx(float(load_balancing_loss_func(
        (torch.from_numpy(a), torch.from_numpy(a[:, ::-1].copy())), E, 1)), rel=1e-6)


def test_load_balancing_loss_names_bad_input():
    with pytest.raises(ValueError, match="router_logits"):
        pymoe.hf.load_balancing_loss([], 4, 2)
    with pytest.raises(ValueError, match="top_k"):
        pymoe.hf.load_balancing_loss([np.zeros((3, 4))], 4, 5)
    with pytest.raises(ValueError, match=r"router_logits\[0\]"):
        pymoe.hf.load_balancing_loss([np.zeros((3, 5))], 4, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        pymoe.hf.load_balancing_loss([np.zeros((3, 4))], 4, 2, np.ones((2, 2)))
    with pytest.raises(ValueError, match="every row is masked"):
        pymoe.hf.load_balancing_loss([np.zeros((4, 4))], 4, 2, np.zeros((2, 2)))


@pytest.mark.parametrize("half", [None, "bfloat16", "float16"])
def test_safetensors_reader_is_the_packages(tmp_path, half):
    """float32/float64 read as stored; bfloat16 and float16 widen to float32 exactly."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b.c": torch.randn(7, generator=g) * 1e30,
               "d": torch.randn(2, 2, generator=g).double()}
    if half:
        tensors = {k: v.to(getattr(torch, half)) for k, v in tensors.items()}
    path = tmp_path / "x.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    f = st.SafetensorsFile(path)
    assert sorted(f.names()) == sorted(tensors)
    for k, v in tensors.items():
        want = v.float().numpy() if half else v.numpy()
        got = f.read(k)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_bfloat16_round_trip_and_rounding():
    x = np.array([1.0, -2.5, 3.140625, 1.00390625, np.inf, -0.0], np.float32)
    bits = st.float32_to_bfloat16(x)
    back = st.bfloat16_to_float32(bits)
    assert np.array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(st.bfloat16_to_float32(st.float32_to_bfloat16(np.array([np.nan], np.float32))))


def test_safetensors_reader_names_bad_files(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        st.SafetensorsFile(p)
    p.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(ValueError, match="not JSON"):
        st.SafetensorsFile(p)
