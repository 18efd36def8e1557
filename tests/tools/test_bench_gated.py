"""The gated-layer benchmark (pymoe.bench.gated): its peers compute pymoe's function on the same
weights, and a quick run writes every row and summary line (timings are never asserted)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pymoe import backends  # noqa: E402
from pymoe.backend import grouped_gemm  # noqa: E402
from pymoe.bench import gated  # noqa: E402
from pymoe.bench.__main__ import main  # noqa: E402
from pymoe.hf import from_transformers  # noqa: E402


@pytest.mark.parametrize("S", [0, 2], ids=["mixtral-like", "deepseek-like"])
def test_peers_compute_the_pymoe_layer(S):
    T, D, H, E, K = 96, 32, 16, 8, 2
    block = gated.hf_block(T, D, H, E, K, S, seed=1)
    layer = gated.on_backend(from_transformers(block), "numpy")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)
    y = layer.forward(x)
    dx = layer.backward(dy)
    calls = gated._hf_calls(block, x, dy)
    # float32 sums in another order (torch's kernels, HF's per-expert loop): round-off apart
    for impl, (fwd, step) in calls.items():
        out = fwd()
        yh = (out[0] if isinstance(out, tuple) else out)[0].numpy()
        np.testing.assert_allclose(yh, y, rtol=1e-4, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(step()[0].numpy(), dx, rtol=1e-4, atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(gated.torch_gated_layer(layer, x, dy, True)().detach().numpy(), y,
                               rtol=1e-4, atol=1e-5)
    assert gated.on_backend(layer, "numpy").params["w1"] is not layer.params["w1"]  # own copies


@pytest.mark.skipif(not backends()["c"].available, reason="C core not built")
def test_quick_gated_rows_and_summary(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--no-dense", "--no-layer", "--no-routing", "--no-sweep",
                 "--repeats", "1", "--E", "8", "--K", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if r["section"].startswith("gated layer (")]
    for op in ("fwd", "fwd+bwd"):
        impls = {r["impl"] for r in rows if r["op"] == op and r["ms"]}
        assert {"pymoe C", "pymoe numpy", "HF block (fastest)", "torch batched autograd",
                "sgemm (the rate)"} <= impls
        if grouped_gemm.load(enable=True)[0] is not None:  # the opt-in grouped GEMM's row
            assert gated.GROUPED in impls
        hf = [r for r in rows if r["op"] == op and r["impl"].startswith("HF ")]
        assert len(hf) == len(gated.HF_IMPLEMENTATIONS)  # each CPU implementation has its row
    sweep = [r for r in data["rows"] if r["section"].startswith("gated layer fwd+bwd vs T")]
    assert [r["T"] for r in sweep] == [256, 512]
    lines = [s for s in data["summary"] if s.startswith("- gated layer")]
    assert len(lines) == 3 and all("sgemm-rate ideal" in s for s in lines[:2])
    assert "speed-up over HF transformers' fastest CPU block" in lines[0]
    assert "per token" in lines[2]


def test_batched_mm_is_left_out_with_the_reason_where_its_gathered_weights_are_huge():
    T, D, H, E, K, _ = gated.SHAPES["Mixtral-like"]
    assert gated.batched_mm_bytes(T, D, H, K) > gated.BATCHED_MM_MAX_BYTES  # 2 x 8192 x 6 MB


@pytest.mark.skipif(not backends()["c"].available, reason="C core not built")
def test_profile_splits_the_step_into_its_parts(capsys):
    from pymoe.bench import profile

    line, parts = profile.profile("DeepSeek-like", repeats=1, small=True)
    assert line.startswith("DeepSeek-like fwd+bwd") and "expert matmuls" in line
    assert parts["matmuls"] > 0 and parts["c_core"] > 0 and parts["ideal"] > 0
    assert parts["matmuls"] + parts["c_core"] + parts["rest"] == pytest.approx(parts["total"])
    with pytest.raises(SystemExit):
        profile.main(["Foo"])
    assert "expected one of Mixtral-like, DeepSeek-like, got 'Foo'" in capsys.readouterr().err
