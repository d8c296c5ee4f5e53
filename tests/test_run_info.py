"""Benchmark result files are named per benchmark and card (benchmarks/run_info.py). The CUDA device is what CI
cannot reach: its name is patched in."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from run_info import card_slug, result_path  # noqa: E402


@pytest.mark.parametrize(
    "device,gpus,slug",
    [("NVIDIA H100 80GB HBM3", 1, "h100"), ("NVIDIA H200", 1, "h200"), ("NVIDIA H200", 2, "2xh200"),
     ("NVIDIA A100-SXM4-80GB", 1, "a100")],
)  # fmt: skip
def test_result_files_are_named_after_the_card(monkeypatch, device, gpus, slug):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: device)
    assert card_slug(gpus) == slug
    assert result_path("attention", gpus=gpus) == f"benchmarks/results/attention-{slug}.json"
    assert result_path("attention", None, ".md", gpus) == f"benchmarks/results/attention-{slug}.md"
    assert result_path("attention", "given.json") == "given.json"


def test_every_committed_result_names_its_card():
    """benchmarks/results holds <benchmark>-<card>.{json,md} pairs (quality results, eval-* and retrofit-*, are
    not per card; code compiled ahead of time names its target, sm90, instead), each markdown naming its command
    and date."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    names = {p.stem for p in results.glob("*.json")}
    for name in names:
        assert (results / f"{name}.md").is_file(), f"{name}.json has no markdown beside it"
        if not name.startswith(("eval-", "retrofit-")):
            assert name.rsplit("-", 1)[-1] in ("h100", "h200", "2xh200", "sm90"), f"{name}: no card in the name"


def test_the_recorded_commit_is_the_argument_then_the_environment_then_git(monkeypatch, tmp_path):
    """Benchmarks and evaluations record one commit (ssa_adapt.provenance): --commit wins, then $SSA_ADAPT_COMMIT
    (the lent GPU machine's tree has no .git), then this checkout's HEAD."""
    import subprocess

    from ssa_adapt.provenance import git_commit

    monkeypatch.delenv("SSA_ADAPT_COMMIT", raising=False)
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode == 0:
        assert git_commit().split("+")[0] == head.stdout.strip()
    monkeypatch.setenv("SSA_ADAPT_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    assert git_commit("f00d") == "f00d"
