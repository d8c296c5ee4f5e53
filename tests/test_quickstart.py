"""A newcomer's first hour: the README's quickstart runs (it is examples/quickstart.py), `make demo` is quiet and
says what to do next, and the command lines explain themselves (`continue_pt.py --help`, `ssa-lm-eval --help`)."""

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"


def run_script(path: Path, monkeypatch, *argv: str) -> int:
    """Run a script in this process (no second start of torch), as `python path argv...`; returns its exit code."""
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        return stop.code or 0
    return 0


@pytest.fixture(scope="module")
def smollm2():
    assets = pytest.importorskip("ssa_adapt.assets")
    try:
        return assets.smollm2_path()
    except assets.AssetUnavailable as err:
        pytest.skip(f"SmolLM2 cannot be had here: {err}")


@pytest.mark.slow
def test_quickstart_runs_offline_and_its_model_generates(smollm2, tmp_path, monkeypatch, capsys):
    out = tmp_path / "quickstart"
    assert run_script(QUICKSTART, monkeypatch, "--tokens", "64", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    for mode in ("sparse", "full"):  # the real model, converted: greedy decoding knows the answer in both modes
        assert re.search(rf"^ *{mode}: 'The capital of France is Paris", printed, re.M), printed
    assert "one SSA step on 64 tokens" in printed and "unloaded: converted = False" in printed
    assert json.loads((out / "config.json").read_text())["ssa_config"]["block_count"] == 16

    # the README's next step, on the saved model: load it, generate in both modes
    generate = ROOT / "examples" / "generate.py"
    prompt = ["--prompt", "The capital of France is", "--max_new_tokens", "3"]
    assert run_script(generate, monkeypatch, str(out), *prompt) == 0
    printed = capsys.readouterr().out
    assert "16x16 blocks, 1 sink" in printed
    assert len(re.findall(r"(sparse|full): 'The capital of France is Paris", printed)) == 2, printed


def test_readme_shows_the_quickstart_file():
    source = QUICKSTART.read_text()
    body = source[source.index("\nimport argparse\n") + 1 :]
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{body}```" in readme, "README's quickstart block differs from examples/quickstart.py"


def test_continue_pt_help_starts_with_the_docstring_and_config(monkeypatch, capsys):
    assert run_script(ROOT / "recipes" / "continue_pt.py", monkeypatch, "--help") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: continue_pt.py [-h] [--config FILE.yaml]")
    assert lines[2].startswith("Continued pretraining of a pretrained causal LM")
    head = "\n".join(lines[: lines.index("options:")])
    assert "asset:smollm2-135m" in head and "asset:debian-docs" in head and "python3.11-doc" in head
    options = lines[lines.index("options:") + 1 :]
    assert options[1].split()[0] == "--config"
    assert run_script(ROOT / "recipes" / "continue_pt.py", monkeypatch, "--config=x.yaml") == 2
    assert "write --config x.yaml (a space, not '=')" in capsys.readouterr().err


def test_ssa_lm_eval_help_names_the_ssa_model(monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from ssa_adapt.eval import lm_eval_cli

    monkeypatch.setattr(sys, "argv", ["ssa-lm-eval", "--help"])
    with pytest.raises(SystemExit):
        lm_eval_cli.main()
    printed = capsys.readouterr().out
    assert printed.startswith("ssa-lm-eval: lm-eval's command line with ssa_adapt's model `ssa`")
    assert "--model ssa --model_args pretrained=PATH" in printed and "block_count" in printed
    assert "usage: lm-eval" in printed  # lm-eval's own help follows


def test_demo_command_prints_no_false_warnings_and_the_next_steps(tmp_path):
    """`make demo`'s own launch line and config, on a tiny model and corpus for two steps."""
    pytest.importorskip("trl")
    from test_trainer import char_tokenizer, texts

    from ssa_adapt.eval import parse_setups

    model_dir, data, out = tmp_path / "tiny", tmp_path / "corpus.jsonl", tmp_path / "run"
    tiny_model("llama", 2).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(64)))
    make = ["make", "-n", "demo", f"PYTHON={sys.executable}"]  # what `make demo` would run, not running it
    dry_run = subprocess.run(make, cwd=ROOT, capture_output=True, text=True)
    launch = shlex.split(next(line for line in dry_run.stdout.splitlines() if "continue_pt.py" in line))
    small = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out)]
    small += ["--max_steps", "2", "--max_length", "64", "--block_size", "4", "--block_count", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(launch + small, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-3000:]
    for noise in ("model_init_kwargs", "is deprecated", "had defaults used instead", "Warning"):
        assert noise not in printed, printed[-3000:]
    assert f"python examples/generate.py {out}" in printed
    setups = re.search(rf"eval_perplexity.py --model {re.escape(str(out))} --setups (\S+ \S+)", printed).group(1)
    assert [s.name for s in parse_setups(setups.split())] == ["full", "sparse-4x4-sink1"]
