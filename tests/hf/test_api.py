"""pymoe.hf's own contract: what from_transformers keeps (no torch), what it refuses, and how
load and state_dict name bad input."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from tiny import randomize, tiny_model

import pymoe
import pymoe.hf
from helpers import REPO
from pymoe.hf import safetensors as st
from pymoe.hf.transformers_block import _find_block


@pytest.fixture(scope="module")
def mixtral():
    model, cfg = tiny_model("mixtral")
    block = _find_block(model)  # decoder layer 0's
    assert block is model.layers[0].mlp
    randomize(block)
    return model, cfg, block


def test_families_lists_every_entry_with_a_known_preset():
    fams = pymoe.hf.families()
    assert {"mixtral", "deepseek_v3", "qwen2_moe"} <= set(fams)
    for name, f in fams.items():
        assert f["preset"] in pymoe.presets(), name
        assert f["form"] in pymoe.expert_forms.EXPERT_FORMS, name
        assert f["router_dtype"] in ("float32", "model"), name


def test_layer_pickles_and_runs_without_torch(mixtral, tmp_path):
    _, _, block = mixtral
    layer = pymoe.hf.from_transformers(block)
    x = np.random.default_rng(0).standard_normal((5, layer.d_model)).astype(np.float32)
    want = layer.forward(x)
    path = tmp_path / "layer.pkl"
    path.write_bytes(pickle.dumps(layer))
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, pickle, numpy as np\n"
            "sys.modules['torch'] = None  # importing torch now fails\n"
            f"layer = pickle.loads(open({str(path)!r}, 'rb').read())\n"
            f"y = layer.forward(np.load({str(tmp_path / 'x.npy')!r}))\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
            "import pymoe.hf; assert sorted(pymoe.hf.state_dict(layer)) == "
            "sorted(['gate.weight', 'experts.gate_up_proj', 'experts.down_proj'])\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert np.array_equal(np.load(tmp_path / "y.npy"), want)


def test_from_transformers_names_what_it_cannot_take(mixtral):
    model, _, block = mixtral
    with pytest.raises(ValueError, match="block: .* is not, and holds no, MoE block"):
        pymoe.hf.from_transformers(model.layers[0].self_attn)
    with pytest.raises(ValueError, match="family: no pymoe.hf entry for 'nope'"):
        pymoe.hf.convert.family_of("nope")


def test_state_dict_refuses_a_layer_the_block_cannot_hold(mixtral):
    _, _, block = mixtral
    layer = pymoe.hf.from_transformers(block)
    layer.params["b1"] = layer.params["b1"] + 1  # Mixtral's experts have no biases
    with pytest.raises(ValueError, match=r"params\['b1'\] is not zero, but mixtral has no tensor"):
        pymoe.hf.state_dict(layer)
    with pytest.raises(ValueError, match="layer: not made by pymoe.hf"):
        pymoe.hf.state_dict(pymoe.MoELayer(8, 8, 4, 2))


def test_build_refuses_unknown_or_missing_tensors(mixtral):
    _, cfg, block = mixtral
    state = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    fam = pymoe.hf.convert.family_of("mixtral")
    with pytest.raises(ValueError, match=r"tensors \['extra.weight'\] have no place"):
        pymoe.hf.convert.build(fam, cfg.to_dict(), {**state, "extra.weight": np.zeros(3)},
                               None, np.float32)
    del state["gate.weight"]
    with pytest.raises((ValueError, KeyError)):
        pymoe.hf.convert.build(fam, cfg.to_dict(), state, None, np.float32)


def test_load_names_bad_paths_and_layers(mixtral, tmp_path):
    model, _, _ = mixtral
    with pytest.raises(ValueError, match="path: expected a checkpoint directory"):
        pymoe.hf.load(tmp_path / "missing", 1)
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(TypeError, match="layer: expected a decoder layer index"):
        pymoe.hf.load(tmp_path / "ck", -1)
    with pytest.raises(ValueError, match="no MoE block at layer 7"):
        pymoe.hf.load(tmp_path / "ck", 7)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="family: no pymoe.hf entry for 'llama'"):
        pymoe.hf.load(tmp_path / "ck", 1)


def test_load_reads_sharded_checkpoints_and_both_spellings(mixtral, tmp_path):
    """A sharded save (max_shard_size) loads the same layer; so does a file that stores the
    fused in-memory names instead of save_pretrained's per-expert ones."""
    model, _, block = mixtral
    want = pymoe.hf.from_transformers(block)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    got = pymoe.hf.load(tmp_path / "sharded", 0)
    assert all(np.array_equal(got.params[n], want.params[n]) for n in want.params)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    st.save(fused / "model.safetensors", {f"model.layers.0.mlp.{k}": v.detach().numpy()
                                          for k, v in block.state_dict().items()})
    got = pymoe.hf.load(fused, 0)
    assert all(np.array_equal(got.params[n], want.params[n]) for n in want.params)
