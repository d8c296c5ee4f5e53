"""Offline assets: every fetch is skipped with its reason when the asset cannot be had, checked for real otherwise.

The first run downloads and converts (SmolLM2 ~30 s, the rest a few seconds each); later runs read the cache.
"""

import json
import subprocess
import sys
import time

import pytest

from ssa_adapt import assets
from ssa_adapt.assets import _fetch, text


def _fetch_or_skip(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except assets.AssetUnavailable as err:
        pytest.skip(str(err))


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------
# Real assets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_is_a_plain_folder_that_says_paris():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _fetch_or_skip(assets.smollm2_path)
    start = time.perf_counter()
    assert assets.smollm2_path() == path
    assert time.perf_counter() - start < 0.5, "a second call must return the cached folder"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.head_dim, config.hidden_size, config.vocab_size) == (64, 576, 49152)
    assert getattr(config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6

    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    continuation = tokenizer.decode(out[0, ids.input_ids.shape[1] :])
    assert continuation.strip().startswith("Paris"), continuation


def test_austen_six_novels():
    novels = _fetch_or_skip(assets.austen_texts)
    assert sorted(novels) == sorted(assets.AUSTEN_TITLES.values())
    assert "Emma Woodhouse" in novels["Emma"]
    assert "It is a truth universally acknowledged" in novels["Pride & Prejudice"]
    for title, novel in novels.items():
        assert len(novel) > 100_000, f"{title}: {len(novel)} characters"


def test_debian_docs_subset_is_prose_jsonl():
    path = _fetch_or_skip(assets.debian_docs_corpus, ["python3.11-doc"])
    assert path.suffix == ".jsonl" and path.is_relative_to(assets.cache_dir())
    rows = _jsonl(path)
    assert len(rows) > 400
    assert all(list(row) == ["text"] and len(row["text"]) >= text.MIN_DOC_CHARS for row in rows)
    joined = "\n".join(row["text"] for row in rows)
    assert "Python is an easy to learn, powerful programming language" in joined
    assert joined.count(" the ") > 10_000
    assert assets.debian_docs_corpus(["python3.11-doc"]) == path


def test_debian_docs_rejects_unknown_package():
    with pytest.raises(ValueError, match="choose one or more of"):
        assets.debian_docs_corpus(["python3.12-doc"])


def test_paul_graham_essays():
    essays = _fetch_or_skip(assets.paul_graham_essays)
    assert len(essays) == 49
    assert all(essays) and sum(map(len, essays)) > 600_000  # two are one-paragraph notes; ~150k tokens in all


def test_benchmark_tasks_rows_and_yamls():
    import yaml

    folder = _fetch_or_skip(assets.benchmark_tasks)
    rows = {task: _jsonl(folder / f"{task}.jsonl") for task in assets.BENCHMARK_TASKS}
    counts = {"ssa_hellaswag": 10042, "ssa_piqa": 1838, "ssa_arc_easy": 570, "ssa_arc_challenge": 299}
    counts |= {"ssa_winogrande": 1267, "ssa_lambada": 5153}
    assert {task: len(r) for task, r in rows.items()} == counts
    for task in ("ssa_hellaswag", "ssa_arc_easy", "ssa_arc_challenge", "ssa_winogrande"):
        choices = "contexts" if task == "ssa_winogrande" else "choices"
        assert all(0 <= row["label"] < len(row[choices]) for row in rows[task]), task
    for task in assets.BENCHMARK_TASKS:
        config = yaml.safe_load((folder / f"{task}.yaml").read_text())
        assert config["task"] == task and config["dataset_path"] == "json"
        (data,) = config["dataset_kwargs"]["data_files"].values()
        assert data == str(folder / f"{task}.jsonl")


@pytest.mark.slow
def test_lm_eval_runs_the_tasks_offline(tmp_path):
    """All six YAMLs load in lm-eval and score 20 items each with its `hf` model on a tiny random Llama."""
    lm_eval = pytest.importorskip("lm_eval")
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = _fetch_or_skip(assets.benchmark_tasks)
    tokenizer = AutoTokenizer.from_pretrained(_fetch_or_skip(assets.smollm2_path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config.update(dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024))
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tmp_path), "dtype": "float32"},
        tasks=list(assets.BENCHMARK_TASKS),
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        limit=20,
        batch_size=16,
        device="cpu",
        log_samples=False,
    )["results"]
    assert sorted(results) == sorted(assets.BENCHMARK_TASKS)
    for task in ("ssa_hellaswag", "ssa_piqa", "ssa_arc_easy", "ssa_arc_challenge", "ssa_winogrande"):
        assert 0.0 <= results[task]["acc,none"] <= 1.0, results[task]
    assert results["ssa_lambada"]["perplexity,none"] > 1.0


# ---------------------------------------------------------------------------------------------------------------
# Plumbing (no download)
# ---------------------------------------------------------------------------------------------------------------


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SSA_ADAPT_CACHE", str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()


def test_failed_command_names_the_command_to_try():
    cmd = [sys.executable, "-c", "import sys; print('no such package', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(assets.AssetUnavailable, match="exited with 3") as err:
        _fetch._run(cmd, "PyPI wheel nothing==0", hint="pip download --no-deps nothing==0")
    assert "Try by hand: pip download --no-deps nothing==0" in str(err.value)
    assert "no such package" in str(err.value)
    assert issubclass(assets.AssetUnavailable, RuntimeError)


def test_missing_apt_is_asset_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("SSA_ADAPT_CACHE", str(tmp_path))
    monkeypatch.setattr(_fetch.shutil, "which", lambda tool: None)
    with pytest.raises(assets.AssetUnavailable, match="apt-get download r-cran-janeaustenr"):
        assets.austen_texts()
    assert not (tmp_path / "text" / "austen.json").exists()


def test_failed_build_leaves_no_cache_entry(tmp_path):
    final = tmp_path / "entry.json"
    with pytest.raises(subprocess.CalledProcessError), _fetch.building(final) as scratch:
        scratch.write_text("half")
        raise subprocess.CalledProcessError(1, "convert")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with _fetch.building(final) as scratch:
        scratch.write_text("whole")
    assert final.read_text() == "whole"


def test_html_to_text_skips_navigation_and_keeps_pre():
    page = (
        '<html><head><title>T</title><style>p {}</style></head><body><div class="navheader"><a>Prev</a></div>'
        "<h2>SELECT</h2><p>retrieve   rows\n from a <code>table</code></p><pre>SELECT *\n  FROM t;</pre>"
        '<div class="navfooter"><div><a>Next</a></div></div><p>after</p></body></html>'
    )
    parser = text._HTMLText()
    parser.feed(page)
    assert parser.text() == "SELECT\n\nretrieve rows from a table\n\nSELECT *\n  FROM t;\n\nafter"


def test_strip_pod_without_pod2text():
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<< $x->y >>\n\n=over 4\n\n=item * one\n\n=back\n\n=cut\n"
    assert text._strip_pod(pod) == "NAME\n\nperlfoo - bold and $x->y\n\n* one"


def test_local_smollm2_gguf_is_checked_before_use(tmp_path, monkeypatch):
    """$SSA_ADAPT_SMOLLM2_GGUF (machines without PyPI): a file that is not the pinned GGUF is refused by name and
    sha256, nothing is downloaded, and no half-built model folder is left behind."""
    monkeypatch.setenv("SSA_ADAPT_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF not really")
    monkeypatch.setenv("SSA_ADAPT_SMOLLM2_GGUF", str(fake))
    monkeypatch.setattr(_fetch, "_run", lambda *a, **k: pytest.fail("a local GGUF must not download anything"))
    with pytest.raises(assets.AssetUnavailable, match="sha256 b179c952") as err:
        assets.smollm2_path()
    assert str(fake) in str(err.value)
    assert not (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct").exists()
