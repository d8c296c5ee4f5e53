"""Tokenize a corpus and pack it for from-scratch pretraining (resumable, with a progress bar).

    python recipes/cache_data.py --dataset_name asset:debian-docs --tokenizer asset:smollm2-135m \
        --out ~/.cache/ssa_adapt/packed/debian-docs-smollm2

`--dataset_name` takes local text / jsonl / parquet files, `asset:debian-docs` (offline) or a Hub dataset id
(streamed with --streaming where the Hub is reachable). Interrupt it at any time: running the same command again
continues where it stopped. Read the result with `ssa_adapt.packed_data.PackedTokenDataset(out, seq_len=8192)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from ssa_adapt.packed_data import build_token_cache
from ssa_adapt.trainer.data import load_text_dataset, resolve_model_name


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True)
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--tokenizer", required=True, help="a model folder, Hub id or asset:smollm2-135m")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--chunk_docs", type=int, default=256, help="documents per write (and per resume point)")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(args.tokenizer))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"Tokenizer {args.tokenizer!r} has no EOS token to separate documents.")
    data = load_text_dataset(
        args.dataset_name, args.dataset_config, split=args.split, streaming=args.streaming, text_field=args.text_field
    )
    total = None if args.streaming else len(data)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    out = build_token_cache(
        (row[args.text_field] for row in data),
        tokenize,
        args.out.expanduser(),
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        tokenizer_name=args.tokenizer,
        chunk_docs=args.chunk_docs,
        total_docs=total,
    )
    print(f"token cache ready: {out}")
    return out


if __name__ == "__main__":
    main()
