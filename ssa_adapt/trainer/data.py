"""Where the recipes' models and raw text come from: local files, the Hub, or the project's offline assets.

Names the recipes accept for `--dataset_name`:

- a local file, folder or glob of `.txt` / `.md` / `.rst` (one document per file), `.json` / `.jsonl` (one
  document per line, text in `dataset_text_field`), `.parquet` or `.csv`; compressed (`.gz`, `.zst`, ...) too;
- `asset:debian-docs` (or `asset:debian-docs:python3.11-doc,perl-doc`): the Debian documentation corpus of
  `ssa_adapt.assets.debian_docs_corpus`, fetched and cached on first use;
- anything else: a Hub dataset id, loaded with `datasets.load_dataset` (streaming when asked).

For `--model_name_or_path`, `asset:smollm2-135m` is SmolLM2-135M-Instruct from `ssa_adapt.assets.smollm2_path`;
anything else is a local folder or Hub id.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from ..local_paths import require_local_path

__all__ = ["load_text_dataset", "resolve_model_name", "resolve_data_files"]

ASSET_PREFIX = "asset:"
_BUILDERS = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def resolve_model_name(name: str) -> str:
    """A model folder or Hub id for `name`, fetching the offline asset `asset:smollm2-135m` when named."""
    if not name.startswith(ASSET_PREFIX):
        return name
    asset = name[len(ASSET_PREFIX) :]
    if asset == "smollm2-135m":
        from ..assets import smollm2_path

        return str(smollm2_path())
    raise ValueError(f"Unknown model asset {name!r}; the offline model is 'asset:smollm2-135m'.")


def _builder(path: str) -> str | None:
    stem = path.lower()
    for ext in _COMPRESSION:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return _BUILDERS.get(os.path.splitext(stem)[1])


def resolve_data_files(name: str) -> tuple[str, list[str]] | None:
    """(builder, files) when `name` is a local file, folder or glob of raw text; None when it is not local."""
    if name.startswith(ASSET_PREFIX):
        asset, _, packages = name[len(ASSET_PREFIX) :].partition(":")
        if asset != "debian-docs":
            raise ValueError(f"Unknown dataset asset {name!r}; the offline corpus is 'asset:debian-docs'.")
        from ..assets import debian_docs_corpus

        return "json", [str(debian_docs_corpus(packages.split(",") if packages else None))]
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _builder(str(p)) is not None)
    elif path.is_file():
        files = [str(path)]
    elif glob.has_magic(name):
        files = sorted(p for p in glob.glob(os.path.expanduser(name), recursive=True) if os.path.isfile(p))
    else:  # a Hub id, unless it looks like a path (a mistyped file name fails here, not after a Hub lookup)
        require_local_path(name, "dataset", tuple(_BUILDERS) + _COMPRESSION)
        return None
    builders = {_builder(f) for f in files}
    if not files or None in builders:
        raise ValueError(
            f"{name!r} holds no readable data files ({files[:3]}...): use .txt/.md/.rst, .json/.jsonl, .parquet or "
            ".csv files (optionally compressed)."
        )
    if len(builders) > 1:
        raise ValueError(f"{name!r} mixes file types {sorted(builders)}; point it at files of one type.")
    return builders.pop(), files


def load_text_dataset(
    name: str, config: str | None = None, *, split: str = "train", streaming: bool = False, text_field: str = "text"
):
    """The `split` of dataset `name` (see the module docstring), as a `datasets.Dataset` or, when `streaming`,
    an `IterableDataset`. Local splits are those of a single `train` split, sliceable: 'train[:99%]', 'train[99%:]'.
    Plain-text files give one example per file in column `text_field`."""
    from datasets import load_dataset

    local = resolve_data_files(name)
    if local is None:
        dataset = load_dataset(name, name=config, split=split, streaming=streaming)
        _check_text(dataset, repr(name), text_field)
        return dataset
    builder, files = local
    where = f"{name!r} ({len(files)} files)" if len(files) > 1 else repr(files[0])
    if all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"{where} is empty (0 bytes): give a file with text to train on.")
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    dataset = load_dataset(builder, data_files={"train": files}, split=split, streaming=streaming, **kwargs)
    if builder == "text" and text_field != "text":
        dataset = dataset.rename_column("text", text_field)
    _check_text(dataset, where, text_field)
    return dataset


def _check_text(dataset, where: str, text_field: str) -> None:
    """Refuse a split with no example, without the column `text_field`, or whose texts are all blank (it would
    train on nothing). A streaming split is checked on its first example only."""
    first = next(iter(dataset), None) if not hasattr(dataset, "__len__") else (dataset[0] if len(dataset) else None)
    if first is None:
        raise ValueError(f"{where} holds no examples (the split is empty): give a dataset with text to train on.")
    if text_field not in first:
        raise ValueError(
            f"{where} has no field {text_field!r}; its fields are {sorted(first)}. Name the text field with "
            f"--dataset_text_field (SSATrainingConfig.dataset_text_field)."
        )
    if hasattr(dataset, "__len__"):
        column = dataset.select_columns([text_field])
        blank = all(not str(t or "").strip() for batch in column.iter(batch_size=1024) for t in batch[text_field])
        if blank:
            raise ValueError(
                f"{where}: every one of its {len(dataset)} examples has an empty {text_field!r}; nothing to train on."
            )
