"""SSATrainer / SSATrainingConfig / recipes/continue_pt.py on tiny random Llama models, on the CPU."""

import copy
import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import ssa_adapt  # noqa: E402
from ssa_adapt import AutoSSAModelForCausalLM, SSAConfig  # noqa: E402
from ssa_adapt.patching import streams  # noqa: E402
from ssa_adapt.trainer import (  # noqa: E402
    SSATrainer,
    SSATrainingConfig,
    draw_stream,
    last_checkpoint,
    load_text_dataset,
)
from ssa_adapt.trainer import trainer as trainer_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SSA = dict(block_size=4, block_count=4)  # receptive field 16 tokens: 64-token rows go sparse
WORDS = "the quick brown fox jumps over a lazy dog while my cat runs far away from home".split()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, 43 tokens: fits the tiny models' vocabulary of 97."""
    chars = string.ascii_lowercase + string.digits + " .,\n"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def texts(n: int = 64, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + "." for _ in range(n)]


def args(tmp_path, **overrides) -> dict:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        max_length=64,
        packing=True,
        packing_strategy="wrapped",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        seed=3,
        disable_tqdm=True,
    )
    values.update(overrides)
    return values


def ssa_trainer(tmp_path, model=None, rows=None, **overrides) -> SSATrainer:
    config = SSATrainingConfig(**args(tmp_path, **{**SSA, **overrides}))
    dataset = datasets.Dataset.from_dict({"text": rows or texts()})
    return SSATrainer(
        model or tiny_model("llama", 2), config, train_dataset=dataset, processing_class=char_tokenizer()
    )


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_trains_and_loss_falls_on_a_repeated_batch(tmp_path):
    trainer = ssa_trainer(tmp_path, rows=[texts(1)[0] * 3] * 32, max_steps=5, attn_sparsity_steps=2)
    trainer.train()
    loss, lm, align = logged(trainer, "loss"), logged(trainer, "lm_loss"), logged(trainer, "align_loss")
    assert len(loss) == len(lm) == len(align) == 5
    assert loss[-1] < loss[0] - 0.5
    assert all(a > 0 for a in align)
    for total, ce, al in zip(loss, lm, align):  # loss = CE + align_weight * L_align, align_weight = 10
        assert total == pytest.approx(ce + 10 * al, rel=1e-5)
    assert set(logged(trainer, "full_stream_fraction")) <= {0.0, 1.0}
    sparsity = logged(trainer, "attn_sparsity")  # steps 0, 2, 4
    assert len(sparsity) == 3 and all(0 < s < 1 for s in sparsity)


def _capture_streams(monkeypatch) -> list:
    """Record (o_full, o_sparse) of every layer's alignment loss."""
    seen = []
    original = streams.alignment_loss

    def capture(o_full, o_sparse, kind, **kwargs):
        seen.append((o_full, o_sparse))
        return original(o_full, o_sparse, kind, **kwargs)

    monkeypatch.setattr(streams, "alignment_loss", capture)
    return seen


@pytest.mark.parametrize("stream", ["full", "sparse"])
def test_alignment_terms_stop_gradients(tmp_path, monkeypatch, stream):
    """L_l = SmoothL1(o_full, sg(o_sparse)) + SmoothL1(sg(o_full), o_sparse): the gradient reaching o_full is the
    first term's alone and the one reaching o_sparse the second's alone. In the trainer's loss, the stream the
    network does not continue with gets exactly align_weight times its term's gradient."""
    trainer = ssa_trainer(tmp_path, gate=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    step = next(s for s in range(100) if draw_stream(trainer.args.seed, s, 0, 0.5) == stream)
    trainer.state.global_step = step
    seen = _capture_streams(monkeypatch)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert ssa_adapt.get_controller(trainer.model).stream == stream
    align = ssa_adapt.alignment_loss(trainer.model)
    assert len(seen) == 2 and align.item() > 0
    assert loss.item() == pytest.approx(trainer._metrics["train"]["lm_loss"][-1] + 10 * align.item(), rel=1e-5)
    per_layer = ssa_adapt.get_controller(trainer.model).align_losses
    for layer, (o_full, o_sparse) in enumerate(seen):
        # the layer's own term (the mean over layers also reaches o_full through the residual stream downstream)
        g_full, g_sparse = torch.autograd.grad(per_layer[layer] / len(seen), [o_full, o_sparse], retain_graph=True)
        term_full = F.smooth_l1_loss(o_full, o_sparse.detach()) / len(seen)  # pulls full toward sparse
        term_sparse = F.smooth_l1_loss(o_full.detach(), o_sparse) / len(seen)  # keeps sparse near full
        (e_full,) = torch.autograd.grad(term_full, o_full, retain_graph=True)
        (e_sparse,) = torch.autograd.grad(term_sparse, o_sparse, retain_graph=True)
        # without the stop-gradients each stream would get both terms' gradients, 2 e_full and 2 e_sparse
        assert e_full.abs().max() > 0 and e_sparse.abs().max() > 0
        torch.testing.assert_close(g_full, e_full, atol=1e-9, rtol=1e-6)
        torch.testing.assert_close(g_sparse, e_sparse, atol=1e-9, rtol=1e-6)
        # the stream the network did not continue with feeds only its alignment term
        other, expected = (o_sparse, e_sparse) if stream == "full" else (o_full, e_full)
        (g_other,) = torch.autograd.grad(loss, other, retain_graph=True)
        torch.testing.assert_close(g_other, 10 * expected, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("packing_strategy", ["wrapped", "bfd"])  # plain packing, padding-free packing
def test_full_mode_without_alignment_equals_sft_trainer(tmp_path, packing_strategy):
    plain = tiny_model("llama", 2)
    converted = copy.deepcopy(plain)
    dataset = datasets.Dataset.from_dict({"text": texts()})
    sft = SFTTrainer(
        plain,
        SFTConfig(**args(tmp_path, packing_strategy=packing_strategy)),
        train_dataset=dataset,
        processing_class=char_tokenizer(),
    )
    sft.train()
    ssa = ssa_trainer(tmp_path, converted, packing_strategy=packing_strategy, train_mode="full", align_weight=0.0)
    ssa.train()
    assert ssa_adapt.is_converted(converted)
    torch.testing.assert_close(logged(ssa, "loss"), logged(sft, "loss"), atol=1e-5, rtol=1e-5)
    assert logged(ssa, "full_stream_fraction") == [1.0, 1.0, 1.0] and not logged(ssa, "align_loss")
    for p, q in zip(plain.parameters(), converted.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_padding_free_batches_keep_documents_apart(tmp_path):
    """TRL's padding-free collator (position_ids restarting per document, cu_seq_lens_q) gives the loss of the
    documents run one by one, in the sparse stream; cu_seq_lens_q alone marks the boundaries too."""
    rows = texts(3, seed=5)
    trainer = ssa_trainer(tmp_path, rows=rows, packing=False, padding_free=True, max_length=None, train_mode="sparse")
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    assert batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in batch
    model = trainer.model.train()
    with torch.no_grad():
        packed = trainer.compute_loss(model, dict(batch)).item()
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]  # no restarts: only cu_seq_lens_q
        by_cu_seqlens = trainer.compute_loss(model, dict(batch)).item()
        total = count = 0
        for example in examples:
            ids = torch.tensor(example["input_ids"])[None]
            assert ids.shape[1] > 16  # longer than the receptive field: the sparse stream is sparse
            total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert packed == pytest.approx(total / count, rel=1e-5)
    assert by_cu_seqlens == pytest.approx(total / count, rel=1e-5)


def test_stream_draw_same_on_every_rank_and_reproducible(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(trainer_module, "set_stream", lambda model, stream: drawn.append(stream))
    runs = []
    for rank_rows in (texts(32, seed=1), texts(32, seed=2), texts(32, seed=1)):  # rank 0, rank 1, rank 0 again
        drawn.clear()
        ssa_trainer(tmp_path, rows=rank_rows, gradient_accumulation_steps=2, per_device_train_batch_size=2).train()
        runs.append(list(drawn))
    expected = [draw_stream(3, step, micro, 0.5) for step in range(3) for micro in range(2)]
    assert runs[0] == runs[1] == runs[2] == expected


def test_stream_frequency_follows_full_prob():
    micro_steps = [(step, micro) for step in range(2000) for micro in range(2)]
    for full_prob in (0.0, 0.25, 0.5, 1.0):
        fraction = sum(draw_stream(0, s, m, full_prob) == "full" for s, m in micro_steps) / len(micro_steps)
        assert abs(fraction - full_prob) < 0.03
    assert [draw_stream(1, s, 0, 0.5) for s in range(64)] != [draw_stream(2, s, 0, 0.5) for s in range(64)]


def test_lora_with_gradient_checkpointing_trains_adapters_only(tmp_path):
    from peft import LoraConfig

    model = tiny_model("llama", 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SSATrainer(
        model,
        SSATrainingConfig(**args(tmp_path, **SSA, max_steps=2, gradient_checkpointing=True)),
        train_dataset=datasets.Dataset.from_dict({"text": texts()}),
        processing_class=char_tokenizer(),
        peft_config=peft_config,
    )
    trainer.train()
    assert ssa_adapt.is_converted(trainer.model) and all(a > 0 for a in logged(trainer, "align_loss"))
    named = dict(trainer.model.named_parameters())
    lora_b = [p for n, p in named.items() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    for name, p in named.items():
        if "lora_" not in name:
            base = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, before[base]), name


def test_model_by_name_plain_or_converted(tmp_path):
    plain_dir, ssa_dir = tmp_path / "plain", tmp_path / "ssa"
    tiny_model("llama", 2).save_pretrained(plain_dir)
    trainer = ssa_trainer(tmp_path, model=str(plain_dir))
    assert ssa_adapt.get_controller(trainer.model).config == SSAConfig(**SSA)

    converted = ssa_adapt.convert(tiny_model("llama", 2), SSAConfig(**SSA, gate=True))
    with torch.no_grad():
        for module in converted.modules():
            if hasattr(module, "ssa_gate"):
                module.ssa_gate.weight.normal_()
    converted.save_pretrained(ssa_dir)
    trainer = ssa_trainer(tmp_path, model=str(ssa_dir), full_prob=0.25)
    config = ssa_adapt.get_controller(trainer.model).config
    assert config.gate and config.full_prob == 0.25 and config.block_size == 4
    gates = {n: p for n, p in trainer.model.named_parameters() if "ssa_gate" in n}
    assert gates and all(torch.equal(p, dict(converted.named_parameters())[n]) for n, p in gates.items())
    with pytest.raises(ValueError, match="gate=True.*gate=False"):
        ssa_trainer(tmp_path, model=str(ssa_dir), gate=False)


def test_config_fields_mirror_ssa_config(tmp_path):
    import dataclasses

    names = {f.name for f in dataclasses.fields(SSATrainingConfig)}
    assert {f.name for f in dataclasses.fields(SSAConfig)} <= names
    config = SSATrainingConfig(output_dir="x", use_cpu=True, **SSAConfig(block_count=8).to_dict())
    assert config.to_ssa_config() == SSAConfig(block_count=8)
    assert config.gradient_checkpointing_kwargs == {"use_reentrant": False}
    trainer = SSATrainer(  # an SFTConfig becomes an SSATrainingConfig with the SSA fields unset
        tiny_model("llama", 2),
        SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_length=64, report_to="none"),
        train_dataset=datasets.Dataset.from_dict({"text": texts(4)}),
        processing_class=char_tokenizer(),
    )
    assert isinstance(trainer.args, SSATrainingConfig) and trainer.args.max_length == 64
    assert ssa_adapt.get_controller(trainer.model).config == SSAConfig()
    with pytest.raises(ValueError, match="train_mode='dense'"):
        SSATrainingConfig(output_dir="x", use_cpu=True, train_mode="dense")
    with pytest.raises(ValueError, match="use_reentrant"):
        SSATrainingConfig(output_dir="x", use_cpu=True, gradient_checkpointing_kwargs={"use_reentrant": True})


def test_local_text_jsonl_parquet_files(tmp_path):
    docs = texts(4)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i}.txt").write_text(doc + "\nsecond line\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(parquet))
    from_txt = load_text_dataset(str(folder))
    assert sorted(from_txt["text"]) == sorted(d + "\nsecond line\n" for d in docs)  # one example per file
    assert load_text_dataset(str(jsonl))["text"] == docs
    assert load_text_dataset(str(parquet), split="train[:2]")["text"] == docs[:2]
    assert list(load_text_dataset(str(jsonl), streaming=True))[3]["text"] == docs[3]


def _launch(workdir: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"),
        *("--config_file", str(ROOT / "recipes/accelerate/single_gpu.yaml")),
        *(str(ROOT / "recipes/continue_pt.py"), "--config", str(workdir / "config.yaml"), *extra),
    ]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_continue_pt_script_checkpoints_and_resumes(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama", 2).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(64)))
    out = tmp_path / "run"
    config = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data),
        "output_dir": str(out),
        "max_length": 64,
        "packing": True,
        "packing_strategy": "bfd",  # padding-free, document boundaries kept
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_steps": 3,
        "report_to": "none",
        "disable_tqdm": True,
        **SSA,
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    _launch(tmp_path, "--max_steps", "3")
    checkpoint = out / "checkpoint-3"
    model = AutoSSAModelForCausalLM.from_pretrained(checkpoint)
    assert ssa_adapt.get_controller(model).config == SSAConfig(**SSA)
    (out / "checkpoint-4").mkdir()  # a save killed midway: "last" skips it
    (out / "checkpoint-4" / "config.json").write_text('{"architectures": ["Lla')
    _launch(tmp_path, "--max_steps", "5", "--resume_from_checkpoint", "last")
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5]
    assert all(h["align_loss"] > 0 for h in state["log_history"] if "loss" in h)
    assert ssa_adapt.is_converted(AutoSSAModelForCausalLM.from_pretrained(out))


def test_resume_refuses_a_checkpoint_without_optimizer_state(tmp_path):
    first = ssa_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, save_only_model=True)
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert not (checkpoint / "optimizer.pt").exists()
    resumed = ssa_trainer(tmp_path, max_steps=4)
    with pytest.raises(ValueError, match=r"lacks optimizer.pt .*, scheduler.pt .*--model_name_or_path .*checkpoint-2"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 0
    (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"lacks trainer_state.json \(the step count"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_last_checkpoint_skips_one_killed_while_saving(tmp_path):
    first = ssa_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    first.train()
    out = tmp_path / "out"
    partial = out / "checkpoint-3"
    partial.mkdir()
    (partial / "config.json").write_text('{"archi')  # SIGKILL while writing the first file
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "trainer_state.json").write_text('{"best_metric": nu')
    with pytest.warns(
        UserWarning, match=r"Skipping incomplete checkpoints .*checkpoint-10.*checkpoint-3.*checkpoint-2"
    ):
        assert last_checkpoint(str(out)) == str(out / "checkpoint-2")
    resumed = ssa_trainer(tmp_path, max_steps=3)
    with pytest.warns(UserWarning, match="Skipping incomplete checkpoints"):
        resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == 3
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3]
    assert last_checkpoint(str(tmp_path / "nowhere")) is None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", r"'.*empty.txt' is empty \(0 bytes\)"),
        ("empty.jsonl", "", r"'.*empty.jsonl' is empty \(0 bytes\)"),
        ("blank.txt", "\n \n", r"'.*blank.txt': every one of its 1 examples has an empty 'text'"),
        ("blanks.jsonl", '{"text": ""}\n{"text": " "}\n', r"every one of its 2 examples has an empty 'text'"),
        (
            "other.jsonl",
            '{"content": "abc"}\n',
            r"has no field 'text'; its fields are \['content'\].*dataset_text_field",
        ),
    ],
)
def test_empty_training_data_is_refused_with_the_file_name(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_text_dataset(str(path))


def test_missing_local_data_file_fails_before_any_hub_lookup(tmp_path, monkeypatch):
    hub = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda path, **kw: hub.append(path) or datasets.Dataset.from_dict({"text": ["x"]})
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("data/corpus.jsonl", "corpus.txt", "data/docs", "./docs", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError, match=f"The dataset '{name}' looks like a local path"):
            load_text_dataset(name)
    assert hub == []
    load_text_dataset("org/corpus")  # a Hub id goes to the Hub
    assert hub == ["org/corpus"]


@pytest.fixture
def graph_breaks():
    """The messages dynamo logs for its graph breaks while the test runs (each names the file it broke in)."""
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks")
    torch._logging.set_logs(graph_breaks=True)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
    torch._logging.set_logs()


@pytest.mark.parametrize(
    "train_mode,checkpointing", [("ssa", False), ("ssa", True), ("sparse", True), ("full", False)]
)
def test_torch_compile_trains_with_the_eager_losses(tmp_path, graph_breaks, train_mode, checkpointing):
    """SSATrainingConfig(torch_compile=True): 5 steps with the losses of eager training (float32 on the CPU, the
    same stream draws: equal to 1e-5; bf16 on a GPU differs by rounding), and no graph break inside ssa_adapt
    (TRL's loss and transformers' checkpointed layers break on their own). aot_eager: dynamo and AOT autograd
    without inductor's code generation (a minute per model here)."""
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = ssa_trainer(
            tmp_path / str(compiled), max_steps=5, train_mode=train_mode, gradient_checkpointing=checkpointing, **extra
        )
        trainer.train()
        runs[compiled] = [logged(trainer, key) for key in ("loss", "lm_loss", "align_loss")]
    torch._dynamo.reset()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert graph_breaks and not [m for m in graph_breaks if "ssa_adapt" in m]  # logging works; none of ours
    assert len(runs[True][0]) == 5 and (len(runs[True][2]) == 5) == (train_mode == "ssa")
    for eager, compiled in zip(runs[False], runs[True]):
        assert compiled == pytest.approx(eager, abs=1e-5)
