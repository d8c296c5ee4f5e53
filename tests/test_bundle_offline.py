"""benchmarks/bundle_offline.py: a file cut into parts carried one call at a time, joined and checked once all came."""

import importlib.util
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bundle_offline", ROOT / "benchmarks" / "bundle_offline.py")
bundle_offline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bundle_offline)


def test_bundle_parts_split_and_join(tmp_path, capsys):
    payload = tmp_path / "bundle.tar.gz"
    payload.write_bytes(random.Random(0).randbytes(2500))
    manifest = bundle_offline.split_file(payload, tmp_path / "parts", 1000)
    assert manifest["parts"] == [f"part-{i:02d}/bundle.tar.gz.{i:02d}" for i in range(3)]
    stash = tmp_path / "stash"  # one call carries one part; the stash keeps what came before
    for i in range(3):
        carried = tmp_path / f"carried-{i}"
        (carried / f"part-{i:02d}").mkdir(parents=True)
        for f in (tmp_path / "parts" / f"part-{i:02d}").iterdir():
            (carried / f"part-{i:02d}" / f.name).write_bytes(f.read_bytes())
        whole = bundle_offline.join_parts(carried, stash)
        assert (whole is None) == (i < 2)
    assert "still to carry: bundle.tar.gz.02" in capsys.readouterr().out
    assert whole.read_bytes() == payload.read_bytes()
    (stash / "bundle.tar.gz.01").write_bytes(b"x" * 1000)
    with pytest.raises(SystemExit, match="fails its sha256"):
        bundle_offline.join_parts(carried, stash)


def test_task_yamls_point_at_the_unbundled_data(tmp_path):
    assert bundle_offline._repointed("    validation: /old/cache/ssa_piqa.jsonl", tmp_path) == (
        f"    validation: {tmp_path / 'ssa_piqa.jsonl'}"
    )
    assert bundle_offline._repointed("task: ssa_piqa", tmp_path) == "task: ssa_piqa"
