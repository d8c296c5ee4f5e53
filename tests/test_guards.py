"""What a new user meets first fails loudly or works: gate weights on load, padding masks, HF's static cache,
kernel backends on the CPU, missing local paths, SSAConfig types (tiny random models, on the CPU)."""

import json
import math
import warnings

import pytest
import torch
from tiny_models import tiny_model, token_batch

import ssa_adapt
from ssa_adapt import AutoSSAModelForCausalLM, SSAConfig

SMALL = SSAConfig(block_size=4, block_count=4)  # receptive field 16 tokens: 40-token rows go sparse


# -- 1. gate weights and the config they are loaded with --------------------------------------------------------


@pytest.fixture
def gated_checkpoint(tmp_path):
    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL.replace(gate=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ssa_gate" in name:
                p.normal_()  # a trained gate: dropping it changes the logits
    model.save_pretrained(tmp_path / "gated")
    return tmp_path / "gated"


def _set_saved_gate(folder, gate: bool) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["ssa_config"]["gate"] = gate
    path.write_text(json.dumps(config))


def test_trained_gate_weights_are_never_dropped_on_load(gated_checkpoint):
    reloaded = AutoSSAModelForCausalLM.from_pretrained(gated_checkpoint)  # the checkpoint's own config: loads
    assert any("ssa_gate" in name for name, _ in reloaded.named_parameters())
    with pytest.raises(ValueError, match=r"holds trained SSA gate weights .*gate=False.*gate=True"):
        AutoSSAModelForCausalLM.from_pretrained(gated_checkpoint, ssa_config=SMALL)
    _set_saved_gate(gated_checkpoint, False)  # config.json says gate: false, the weights hold gates
    with pytest.raises(ValueError, match=r"holds trained SSA gate weights .*config.json's ssa_config has gate=False"):
        AutoSSAModelForCausalLM.from_pretrained(gated_checkpoint)
    with pytest.raises(ValueError, match=r"is \(4, 32\) but .*train_mode='nsa'\) builds \(12, 32\)"):  # 3 x HQ rows
        AutoSSAModelForCausalLM.from_pretrained(gated_checkpoint, ssa_config=SMALL.replace(train_mode="nsa"))


def test_gate_weights_missing_where_the_config_asks_for_them(tmp_path):
    ssa_adapt.convert(tiny_model("llama", 2), SMALL).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="asks for SSA gates.*holds no ssa_gate weights"):
        AutoSSAModelForCausalLM.from_pretrained(tmp_path, ssa_config=SMALL.replace(gate=True))
    _set_saved_gate(tmp_path, True)
    with pytest.raises(ValueError, match="config.json's ssa_config of .* asks for SSA gates"):
        AutoSSAModelForCausalLM.from_pretrained(tmp_path)


# -- 2. padding masks: left padding exact, any mask exact in full mode, holes refused by the sparse stream ----------


def _masked_logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def _masks(length=40):
    left, right, holes = (torch.ones(2, length, dtype=torch.long) for _ in range(3))
    left[1, :9] = 0
    right[1, -9:] = 0
    holes[0, 5:8] = 0
    holes[1, 20:31] = 0
    holes[1, -2:] = 0
    return {"left": left, "right": right, "holes": holes}


SLIDING = dict(  # layers 1 and 3 keep ordinary (windowed) attention
    layers=4,
    use_sliding_window=True,
    sliding_window=8,
    max_window_layers=2,
    layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
)


@pytest.mark.parametrize(
    "arch, extra", [("llama", {}), ("qwen3", {}), ("qwen3", SLIDING)], ids=["llama", "qwen3", "sliding"]
)
def test_padding_masks_against_sdpa(arch, extra):
    plain = tiny_model(arch, 3, **extra)
    model = ssa_adapt.convert(tiny_model(arch, 3, **extra), SMALL)
    ids = token_batch(2, 40)
    for kind, mask in _masks().items():
        real = mask.bool()
        expected = _masked_logits(plain, ids, mask)
        ssa_adapt.set_inference(model, "full")
        torch.testing.assert_close(_masked_logits(model, ids, mask)[real], expected[real], atol=1e-5, rtol=0)
        ssa_adapt.set_inference(model, "sparse")
        if kind == "holes":
            with pytest.raises(
                ValueError, match=r"rows \[0, 1\] have padding after a real token.*padding_side='left'"
            ):
                _masked_logits(model, ids, mask)
        else:  # the sparse stream sees no padding key: the unpadded row alone gives the same logits
            sparse = _masked_logits(model, ids, mask)
            row = ids[1:, 9:] if kind == "left" else ids[1:, :-9]
            alone = _masked_logits(model, row, None)
            torch.testing.assert_close(sparse[1:][real[1:]], alone.flatten(0, 1), atol=1e-5, rtol=0)


def test_right_padded_prompt_then_cached_decoding():
    """Right padding followed by cached decoding leaves padding keys in the cache: full mode masks them as SDPA
    does; the sparse stream refuses instead of attending to them."""
    from tiny_models import cache_kwargs
    from transformers import DynamicCache

    plain = tiny_model("llama", 2)
    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL)
    ids = token_batch(2, 41)
    mask = torch.ones(2, 41, dtype=torch.long)
    mask[1, 30:40] = 0  # row 1: a 30-token prompt, 10 pads, then a decoded token
    steps = {}
    for name, m in (("plain", plain), ("full", model)):
        if name == "full":
            ssa_adapt.set_inference(model, "full")
        cache = DynamicCache()
        with torch.no_grad():
            m(ids[:, :40], attention_mask=mask[:, :40], **cache_kwargs(cache))
            steps[name] = m(ids[:, 40:], attention_mask=mask, **cache_kwargs(cache)).logits
    torch.testing.assert_close(steps["full"], steps["plain"], atol=1e-5, rtol=0)
    ssa_adapt.set_inference(model, "sparse")
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :40], attention_mask=mask[:, :40], **cache_kwargs(cache))  # no cached keys yet: fine
        with pytest.raises(ValueError, match=r"rows \[1\] .*right padding followed by cached decoding"):
            model(ids[:, 40:], attention_mask=mask, **cache_kwargs(cache))


def test_ssa_training_refuses_masks_with_holes():
    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL).train()
    ids, mask = token_batch(2, 40), _masks()["holes"]
    with pytest.raises(ValueError, match=r"train_mode='ssa'"):
        model(ids, attention_mask=mask, labels=ids)
    full = ssa_adapt.convert(tiny_model("llama", 2), SMALL.replace(train_mode="full")).train()
    assert torch.isfinite(full(ids, attention_mask=mask, labels=ids).loss)


# -- 5. transformers' StaticCache ------------------------------------------------------------------------------


def _argmax_loop(model, prompt, steps):
    ids = prompt
    for _ in range(steps):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_static_cache_generate_equals_the_loop():
    plain = tiny_model("llama", 2)
    prompt = token_batch(1, 40)
    kwargs = dict(max_new_tokens=24, do_sample=False)
    static = plain.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, plain.generate(prompt, **kwargs))  # the unconverted model: static == dynamic
    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL)
    for mode in ("full", "sparse"):
        ssa_adapt.set_inference(model, mode)
        out = model.generate(prompt, cache_implementation="static", **kwargs)
        assert torch.equal(out, _argmax_loop(model, prompt, 24)), mode


# -- 7. kernel backends on the CPU -----------------------------------------------------------------------------


def test_triton_backend_on_cpu_tensors_falls_back_with_a_warning(tmp_path):
    ids = token_batch(2, 40)
    reference = ssa_adapt.convert(tiny_model("llama", 2), SMALL.replace(backend="reference"))
    with torch.no_grad():
        expected = reference(ids).logits
    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL.replace(backend="triton"))
    with pytest.warns(UserWarning, match="backend='triton' runs on CUDA tensors only.*backend='auto'"):
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)  # a checkpoint saved with backend='triton' (as on a GPU machine)
    reloaded = AutoSSAModelForCausalLM.from_pretrained(tmp_path)
    ssa_adapt.set_inference(reloaded, "full", backend="fla")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            assert torch.isfinite(reloaded(ids).logits).all()
        reloaded.train()
        ssa_adapt.set_inference(reloaded, backend="triton")
        loss = reloaded(ids, labels=ids).loss
        ssa_adapt.ssa_loss(reloaded, loss).backward()  # both streams and the alignment loss


# -- 9. missing local paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/nonexistent", "./runs/ckpt-1", "~/no/such/model"])
def test_missing_model_folder_is_named(name):
    with pytest.raises(FileNotFoundError, match=f"The model '{name}' looks like a local path.*does not exist"):
        AutoSSAModelForCausalLM.from_pretrained(name)


def test_lm_eval_model_names_a_missing_folder():
    pytest.importorskip("lm_eval")
    from ssa_adapt.eval.lm_eval_model import SSALM

    with pytest.raises(FileNotFoundError, match="The model '/nonexistent' looks like a local path"):
        SSALM(pretrained="/nonexistent", device="cpu")


# -- 10. SSAConfig types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("full_prob", "0.5", r"full_prob='0.5': must be a probability in \[0, 1\].*given as a number"),
        ("full_prob", True, r"full_prob=True: must be a probability"),
        ("align_weight", math.nan, r"align_weight=nan: must be a finite number >= 0"),
        ("align_weight", math.inf, r"align_weight=inf: must be a finite number >= 0"),
        ("align_weight", -1.0, r"align_weight=-1.0: must be >= 0"),
        ("gate", "yes", r"gate='yes': must be True or False"),
        ("gate", 1, r"gate=1: must be True or False"),
        ("layers", 5, r"layers=5: give a list of layer indices \(layers=\[5\] for one layer\)"),
        ("layers", "0,1", r"layers='0,1': give a list of layer indices"),
        ("layers", [0, True], r"layers=\[0, True\]: give distinct non-negative layer indices"),
    ],
)
def test_config_types_are_validated_with_the_field_and_the_fix(field, value, message):
    with pytest.raises(ValueError, match=message):
        SSAConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        SSAConfig.from_dict({field: value})


def test_config_accepts_plain_numbers_and_sequences():
    config = SSAConfig(full_prob=1, align_weight=0, layers=(2, 0))
    assert config.layers == [0, 2] and config.full_prob == 1
