"""recipes/pretrain.py: the debug config trains in each of the paper's four modes; long-context continuation."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the pretraining recipe needs trl: pip install 'ssa_adapt[train]'")

from trl import TrlParser  # noqa: E402

import ssa_adapt  # noqa: E402
from ssa_adapt.packed_data import build_token_cache  # noqa: E402
from ssa_adapt.trainer import SSATrainingConfig  # noqa: E402

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("pretrain", ROOT / "recipes" / "pretrain.py")
pretrain = importlib.util.module_from_spec(spec)
sys.modules["pretrain"] = pretrain
spec.loader.exec_module(pretrain)

pytestmark = pytest.mark.slow  # the recipe saves its model with the real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    """Exactly two 256-token sequences: every step of batch 2 sees the same (repeated) batch. Character codes
    stand for tokens (valid ids of the SmolLM2 tokenizer the recipe saves with the model)."""
    assets = pytest.importorskip("ssa_adapt.assets")
    try:
        assets.smollm2_path()
    except assets.AssetUnavailable as err:
        pytest.skip(f"the recipe's tokenizer (SmolLM2) cannot be had here: {err}")
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. "
    docs = [text[i % 40 :] * 2 for i in range(3)]
    folder = tmp_path_factory.mktemp("cache")
    build_token_cache(docs, lambda ts: [[ord(c) for c in t] for t in ts], folder, vocab_size=256, eos_token_id=0)
    meta = json.loads((folder / "meta.json").read_text())
    assert 512 <= meta["n_tokens"] < 768
    return folder


def _run(token_cache, tmp_path, *overrides):
    parser = TrlParser((pretrain.PretrainArguments, SSATrainingConfig))
    args = [
        "--config",
        str(ROOT / "recipes/configs/pretrain-debug.yaml"),
        "--token_cache",
        str(token_cache),
        "--output_dir",
        str(tmp_path),
        *overrides,
    ]
    script_args, training_args = parser.parse_args_and_config(args)
    return pretrain.main(script_args, training_args)


@pytest.mark.parametrize("mode", ["full", "sparse", "nsa", "ssa"])
def test_debug_config_trains_in_each_mode(token_cache, tmp_path, mode):
    trainer = _run(token_cache, tmp_path, "--train_mode", mode)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.3
    model = trainer.model
    assert ssa_adapt.get_controller(model).config.train_mode == mode
    assert model.model.layers[0].self_attn.ssa_gate.out_features == (24 if mode == "nsa" else 8)
    if mode == "ssa":
        assert all(h["align_loss"] > 0 for h in trainer.state.log_history if "align_loss" in h)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ssa_config"]["train_mode"] == mode and saved["num_hidden_layers"] == 2


def test_long_context_continuation_takes_new_rope(token_cache, tmp_path):
    first = _run(token_cache, tmp_path)
    rope = json.dumps(
        dict(
            rope_type="llama3",
            factor=4.0,
            original_max_position_embeddings=128,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
        )
    )
    args = pretrain.PretrainArguments(
        token_cache=str(token_cache), init_from=str(tmp_path), rope_scaling=rope, max_position_embeddings=512
    )
    model = pretrain.build_model(args, vocab_size=first.model.config.vocab_size)
    assert model.config.rope_parameters["rope_type"] == "llama3" and model.config.rope_parameters["factor"] == 4.0
    assert model.config.max_position_embeddings == 512
    assert ssa_adapt.get_controller(model).config.gate is True
    trained = first.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    base_inv_freq = first.model.model.rotary_emb.inv_freq
    assert not torch.allclose(model.model.rotary_emb.inv_freq, base_inv_freq)  # llama3 scaling changed RoPE
