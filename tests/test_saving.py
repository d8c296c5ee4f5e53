"""save_pretrained / AutoSSAModelForCausalLM / push_to_hub / PEFT LoRA on converted models.

Reloads run in a fresh subprocess so nothing of the saving process (registered functions, module state) helps.
The Hub's network calls (create_repo, create_commit, the model card download) are the only things replaced:
the pushed files are laid out as a Hub cache and loaded by repo id with HF_HUB_OFFLINE=1.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, token_batch

import ssa_adapt
from ssa_adapt import AutoSSAModelForCausalLM, SSAConfig

CONFIG = SSAConfig(block_size=4, block_count=4, gate=True)


def _trained(model, steps=2):
    """A few SGD steps so the gate and the weights move away from their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = token_batch()
    model.train()
    for stream in ["full", "sparse"][:steps]:
        ssa_adapt.set_stream(model, stream)
        out = model(ids, labels=ids)
        ssa_adapt.ssa_loss(model, out.loss).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _logits_in_subprocess(load_expr: str, env: dict | None = None) -> torch.Tensor:
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tiny_models import token_batch
        import ssa_adapt
        from ssa_adapt import AutoSSAModelForCausalLM
        model = {load_expr}
        model.eval()
        with torch.no_grad():
            sparse = model(token_batch()).logits
            ssa_adapt.set_inference(model, "full")
            full = model(token_batch()).logits
        torch.save(torch.stack([sparse, full]), sys.argv[1])
        """
    )
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"logits-{os.getpid()}-{abs(hash(load_expr))}.pt"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env={**os.environ, **(env or {})})
    return torch.load(out)


def _local_logits(model):
    with torch.no_grad():
        ssa_adapt.set_inference(model, "sparse")
        sparse = model(token_batch()).logits
        ssa_adapt.set_inference(model, "full")
        full = model(token_batch()).logits
        ssa_adapt.set_inference(model, "sparse")
    return torch.stack([sparse, full])


def test_save_and_reload_in_fresh_process(tmp_path):
    model = _trained(ssa_adapt.convert(tiny_model("qwen3", 3), CONFIG))
    ssa_adapt.set_inference(model, block_count=3)  # an inference change is saved too
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ssa_config"]["gate"] is True and saved["ssa_config"]["block_count"] == 3
    reloaded = _logits_in_subprocess(f"AutoSSAModelForCausalLM.from_pretrained({str(tmp_path)!r})")
    torch.testing.assert_close(reloaded, _local_logits(model), atol=1e-5, rtol=0)


def test_plain_checkpoint_converts_on_load_and_refuses_without_config(tmp_path):
    plain = tiny_model("llama", 2)
    plain.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="plain checkpoint"):
        AutoSSAModelForCausalLM.from_pretrained(tmp_path)
    model = AutoSSAModelForCausalLM.from_pretrained(tmp_path, ssa_config=SSAConfig(block_size=4, block_count=4))
    assert ssa_adapt.is_converted(model)
    ssa_adapt.set_inference(model, "full")
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch()).logits, plain(token_batch()).logits, atol=1e-5, rtol=0)


def test_push_to_hub_uploads_the_saved_folder_and_loads_by_repo_id(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    pushed = {}

    class _Repo:
        repo_id = "someone/tiny-ssa"

    def create_repo(self, repo_id, **kwargs):
        return _Repo()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            pushed[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return None

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no model card on this fake Hub")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, *a, **k: no_card()))
    model = _trained(ssa_adapt.convert(tiny_model("qwen2", 2), CONFIG))
    model.push_to_hub("someone/tiny-ssa")
    assert {"config.json", "model.safetensors"} <= set(pushed)
    assert json.loads(pushed["config.json"])["ssa_config"]["gate"] is True

    # lay the pushed files out as the Hub cache would hold them, and load by repo id offline
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-ssa" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, data in pushed.items():
        (snapshot / name).write_bytes(data)
    (cache / "models--someone--tiny-ssa" / "refs").mkdir()
    (cache / "models--someone--tiny-ssa" / "refs" / "main").write_text("0" * 40)
    reloaded = _logits_in_subprocess(
        "AutoSSAModelForCausalLM.from_pretrained('someone/tiny-ssa')",
        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )
    torch.testing.assert_close(reloaded, _local_logits(model), atol=1e-5, rtol=0)


def test_lora_on_converted_model_trains_and_round_trips(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = ssa_adapt.convert(tiny_model("llama", 3), SSAConfig(block_size=4, block_count=4))
    base.save_pretrained(tmp_path / "base")
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    assert ssa_adapt.is_converted(lora)
    lora.train()
    ids = token_batch()
    trainable = [p for p in lora.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.1)
    ssa_adapt.set_stream(lora, "sparse")
    out = lora(input_ids=ids, labels=ids)
    loss = ssa_adapt.ssa_loss(lora, out.loss)
    loss.backward()
    opt.step()
    assert ssa_adapt.alignment_loss(lora) is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
    lora.eval()
    lora.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    fresh = AutoSSAModelForCausalLM.from_pretrained(tmp_path / "base")
    restored = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["lora", "modules_to_save"])
def test_peft_on_the_output_gate_reaches_the_attention(how):
    """The gate runs through its module, so PEFT's wrappers apply: LoRA on `ssa_gate` (or a trainable copy through
    modules_to_save) changes the attention output and gets a gradient from the SSA loss, in both streams."""
    from peft import LoraConfig, get_peft_model

    base = ssa_adapt.convert(tiny_model("llama", 2), SSAConfig(block_size=4, block_count=4, gate=True))
    ids = token_batch()
    base.eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    if how == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["ssa_gate"], init_lora_weights=False)
    else:
        config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["ssa_gate"])
    peft_model = get_peft_model(base, config)
    if how == "modules_to_save":
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "modules_to_save" in name and "ssa_gate" in name:
                    p.add_(1.0)  # only the trainable copy changes
    peft_model.eval()
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - plain).abs().max() > 1e-4
    peft_model.train()
    for stream in ("full", "sparse"):
        peft_model.zero_grad()
        ssa_adapt.set_stream(peft_model, stream)
        out = peft_model(input_ids=ids, labels=ids)
        ssa_adapt.ssa_loss(peft_model, out.loss).backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if "ssa_gate" in n and p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), stream


def test_load_causal_lm_applies_overrides_and_keeps_plain_checkpoints_plain(tmp_path):
    """The one load-or-convert: a converted checkpoint comes back with its SSAConfig and the overrides over it (never
    a change of gate or layers, which decide its weights); a plain one stays plain unless overrides convert it."""
    from ssa_adapt.modeling import load_causal_lm

    plain, converted = tmp_path / "plain", tmp_path / "converted"
    tiny_model("llama", 2).save_pretrained(plain)
    ssa_adapt.convert(tiny_model("llama", 2), SSAConfig(block_size=4, block_count=4, gate=True)).save_pretrained(
        converted
    )
    assert not ssa_adapt.is_converted(load_causal_lm(str(plain)))
    model = load_causal_lm(str(plain), ssa_overrides={"block_count": 8})
    assert ssa_adapt.get_controller(model).config == SSAConfig(block_count=8)
    model = load_causal_lm(str(converted), ssa_overrides={"inference_mode": "full", "block_count": 6})
    config = ssa_adapt.get_controller(model).config
    assert (config.gate, config.block_size, config.block_count, config.inference_mode) == (True, 4, 6, "full")
    assert json.loads(json.dumps(model.config.ssa_config))["block_count"] == 6  # what save_pretrained writes
    with pytest.raises(ValueError, match="converted with gate=True; the overrides ask for gate=False"):
        load_causal_lm(str(converted), ssa_overrides={"gate": False})
    with pytest.raises(ValueError, match="ssa_config .* or ssa_overrides"):
        load_causal_lm(str(converted), ssa_config=SSAConfig(), ssa_overrides={})


def test_reconfigure_changes_the_config_but_not_which_weights_exist():
    model = ssa_adapt.convert(tiny_model("llama", 2), SSAConfig(block_size=4, block_count=4))
    config = ssa_adapt.reconfigure(model, full_prob=0.25, align_weight=5.0)
    assert ssa_adapt.get_controller(model).config is config and (config.full_prob, config.align_weight) == (0.25, 5.0)
    assert model.config.ssa_config["full_prob"] == 0.25
    with pytest.raises(ValueError, match=r"gate=True \(converted with False\)"):
        ssa_adapt.reconfigure(model, gate=True)
    with pytest.raises(ValueError, match="full_prob"):
        ssa_adapt.reconfigure(model, full_prob=2.0)
    assert ssa_adapt.get_controller(model).config.full_prob == 0.25  # a refused change leaves the config as it was
