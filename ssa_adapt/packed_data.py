"""A tokenized, packed pretraining corpus on disk: build it resumably, read it as fixed-length sequences.

Layout of a cache folder:
    tokens.bin      the token stream, documents back to back each followed by EOS (uint16 when vocab < 65536,
                    else uint32), memory-mapped for reading
    doc_starts.bin  int64 offset of every document's first token in the stream
    meta.json       {"dtype", "n_tokens", "n_docs", "docs_consumed", "tokenizer", "eos_token_id", "complete"}

Sequence i of length L covers stream tokens [i * L, (i + 1) * L); its position_ids restart at 0 at every
document start inside it (and at the sequence start), so the SSA attention sees document boundaries.
Building appends in chunks and records progress in meta.json after each chunk: an interrupted build resumes
where it stopped and gives the same files as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["build_token_cache", "PackedTokenDataset"]

_META = "meta.json"


def _read_meta(folder: Path) -> dict | None:
    path = folder / _META
    return json.loads(path.read_text()) if path.is_file() else None


def _write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / (_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / _META)  # atomic: a crash leaves the old or the new progress, never half of one


def _truncate(path: Path, n_items: int, itemsize: int) -> None:
    """Drop whatever an interrupted chunk appended after the last recorded progress."""
    with open(path, "ab") as f:
        f.truncate(n_items * itemsize)


def build_token_cache(
    documents: Iterable[str],
    tokenize: Callable[[list[str]], list[list[int]]],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    eos_token_id: int,
    tokenizer_name: str = "",
    chunk_docs: int = 256,
    total_docs: int | None = None,
) -> Path:
    """Tokenize `documents` into `out_dir` (resumable). Returns the folder.

    `tokenize(texts) -> token id lists` (e.g. a HF tokenizer's batch call without special tokens); every
    document is followed by `eos_token_id`. Re-running on the same documents after an interruption skips the
    documents already written.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    meta = _read_meta(folder) or {
        "dtype": np.dtype(dtype).name,
        "n_tokens": 0,
        "n_docs": 0,
        "docs_consumed": 0,
        "tokenizer": tokenizer_name,
        "eos_token_id": int(eos_token_id),
        "complete": False,
    }
    if meta["complete"]:
        return folder
    if meta["dtype"] != np.dtype(dtype).name or meta["eos_token_id"] != eos_token_id:
        raise ValueError(f"{folder} holds a cache of another tokenizer ({meta}); use a fresh folder.")
    tokens_path, starts_path = folder / "tokens.bin", folder / "doc_starts.bin"
    tokens_path.touch()
    starts_path.touch()
    _truncate(tokens_path, meta["n_tokens"], np.dtype(dtype).itemsize)
    _truncate(starts_path, meta["n_docs"], 8)

    skip = meta["docs_consumed"]
    bar = tqdm(total=total_docs, initial=skip, desc="tokenizing", unit="doc")
    batch: list[str] = []

    def flush() -> None:
        ids = tokenize(batch)
        lengths = np.array([len(x) + 1 for x in ids if x], dtype=np.int64)
        flat = np.fromiter((t for x in ids if x for t in (*x, eos_token_id)), dtype=dtype)
        starts = meta["n_tokens"] + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        with open(tokens_path, "ab") as f:
            f.write(flat.tobytes())
        with open(starts_path, "ab") as f:
            f.write(starts.astype(np.int64).tobytes())
        meta["n_tokens"] += int(flat.size)
        meta["n_docs"] += int(len(lengths))
        meta["docs_consumed"] += len(batch)
        _write_meta(folder, meta)
        bar.update(len(batch))
        bar.set_postfix(tokens=f"{meta['n_tokens'] / 1e6:.1f}M")
        batch.clear()

    for index, text in enumerate(documents):
        if index < skip:
            continue
        batch.append(text)
        if len(batch) >= chunk_docs:
            flush()
    if batch:
        flush()
    bar.close()
    meta["complete"] = True
    _write_meta(folder, meta)
    return folder


class PackedTokenDataset(torch.utils.data.Dataset):
    """Fixed-length sequences from a token cache: items {"input_ids", "position_ids", "labels"} of length
    `seq_len` (int64 [seq_len]); the stream's tail shorter than seq_len is dropped."""

    def __init__(self, folder: str | os.PathLike, seq_len: int):
        folder = Path(folder)
        meta = _read_meta(folder)
        if meta is None:
            raise FileNotFoundError(
                f"{folder} is not a token cache (no {_META}); build it with recipes/cache_data.py."
            )
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: must be >= 2.")
        self.meta, self.seq_len = meta, seq_len
        self.tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
        self.doc_starts = np.fromfile(folder / "doc_starts.bin", dtype=np.int64, count=meta["n_docs"])

    def __len__(self) -> int:
        return self.meta["n_tokens"] // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)}).")
        lo, hi = i * self.seq_len, (i + 1) * self.seq_len
        ids = torch.from_numpy(self.tokens[lo:hi].astype(np.int64))
        inside = self.doc_starts[np.searchsorted(self.doc_starts, lo) : np.searchsorted(self.doc_starts, hi)]
        segment_start = np.zeros(self.seq_len, dtype=np.int64)
        segment_start[inside - lo] = inside - lo
        segment_start = np.maximum.accumulate(segment_start)  # start of the document each token belongs to
        positions = torch.from_numpy(np.arange(self.seq_len, dtype=np.int64) - segment_start)
        return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}

    def as_hf_dataset(self):
        """A `datasets.Dataset` of sequence indices whose rows read their tokens from the memory map on access
        (what TRL's trainers take; nothing is copied)."""
        import datasets

        def read(batch: dict) -> dict:
            items = [self[int(i)] for i in batch["sequence"]]
            return {key: [item[key] for item in items] for key in ("input_ids", "position_ids", "labels")}

        return datasets.Dataset.from_dict({"sequence": list(range(len(self)))}).with_transform(read)
