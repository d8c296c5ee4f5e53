"""Needle in a haystack over the Paul Graham essays: build, run (greedy decoding), score, plot.

A sample is `context_len` tokens: the essays (repeated if needed) with one needle sentence, "The special magic
number is NNNNNNN.", inserted at a sentence boundary near `depth` (0 = start, 1 = end of the haystack), then a
question whose answer prefix the model completes. The score is 1 when the generated text contains the number
(not as part of a longer number), else 0. The grid is context lengths x depths; `plot_niah_heatmaps` draws one
panel per model setup.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = [
    "NEEDLE",
    "QUESTION",
    "NIAHSample",
    "build_niah_sample",
    "score_niah",
    "run_niah",
    "plot_niah_heatmaps",
    "essay_haystack_ids",
]

NEEDLE = " The special magic number is {value}."
QUESTION = "\n\nWhat is the special magic number mentioned in the text above? The special magic number is"
HEADER = "There is a special magic number hidden in the following text. Remember it.\n\n"


@dataclass
class NIAHSample:
    """One prompt: `input_ids` of exactly `context_len` tokens, the needle at token `needle_start`."""

    input_ids: list[int]
    answer: str
    context_len: int
    depth: float  # requested, as a fraction of the haystack
    needle_start: int  # token index of the needle's first token in input_ids
    haystack_start: int  # token index of the haystack's first token
    haystack_len: int  # haystack tokens (the needle not counted)

    @property
    def actual_depth(self) -> float:
        """Where the needle landed, as a fraction of the haystack."""
        return (self.needle_start - self.haystack_start) / max(self.haystack_len, 1)


def essay_haystack_ids(tokenizer, essays: Sequence[str] | None = None) -> list[int]:
    """The essays (default: ``ssa_adapt.assets.paul_graham_essays()``) joined by blank lines, as token ids."""
    if essays is None:
        from ..assets import paul_graham_essays

        essays = paul_graham_essays()
    return tokenizer("\n\n".join(e.strip() for e in essays), add_special_tokens=False).input_ids


def _sentence_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """Token positions p such that the haystack may be cut before ids[p] (the previous token ends a sentence)."""
    ends = [0]
    vocab_cache: dict[int, bool] = {}
    for p, tok in enumerate(ids):
        if tok not in vocab_cache:
            vocab_cache[tok] = tokenizer.decode([tok]).rstrip().endswith((".", "!", "?"))
        if vocab_cache[tok]:
            ends.append(p + 1)
    return ends


def build_niah_sample(
    tokenizer,
    haystack_ids: Sequence[int],
    context_len: int,
    depth: float,
    value: str | int,
    *,
    needle: str = NEEDLE,
    question: str = QUESTION,
    header: str = HEADER,
    bos: bool = True,
) -> NIAHSample:
    """A prompt of exactly `context_len` tokens with the needle at the sentence boundary nearest to `depth`.

    Layout: [BOS] header | haystack[:p] | needle | haystack[p:H] | question, where H fills the context and p is the
    sentence end closest to depth * H. The haystack repeats if it is shorter than H.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: use a fraction of the haystack in [0, 1].")
    value = str(value)
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    prefix = ([tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []) + enc(header)
    needle_ids, question_ids = enc(needle.format(value=value)), enc(question)
    H = context_len - len(prefix) - len(needle_ids) - len(question_ids)
    if H < 1:
        raise ValueError(
            f"context_len={context_len} leaves no room for a haystack; use at least {context_len - H + 1}."
        )
    if not haystack_ids:
        raise ValueError("The haystack is empty.")
    reps = -(-H // len(haystack_ids))
    hay = (list(haystack_ids) * reps)[:H]
    target = depth * H
    ends = _sentence_ends(tokenizer, hay) + [H]
    p = min(ends, key=lambda e: (abs(e - target), e))
    ids = prefix + hay[:p] + needle_ids + hay[p:] + question_ids
    assert len(ids) == context_len
    return NIAHSample(
        input_ids=ids,
        answer=value,
        context_len=context_len,
        depth=float(depth),
        needle_start=len(prefix) + p,
        haystack_start=len(prefix),
        haystack_len=H,
    )


def score_niah(generated: str, answer: str) -> float:
    """1.0 when `answer` appears in `generated` as a whole number (not inside a longer digit string), else 0.0."""
    return 1.0 if re.search(rf"(?<!\d){re.escape(str(answer))}(?!\d)", generated) else 0.0


@dataclass
class NIAHResult:
    """Scores per (context length, depth): mean over samples; `samples` keeps each generation."""

    context_lengths: list[int]
    depths: list[float]
    scores: dict[str, float] = field(default_factory=dict)  # "ctx@depth" -> mean score
    samples: list[dict] = field(default_factory=list)

    def grid(self) -> list[list[float]]:
        """[len(depths)][len(context_lengths)] mean scores."""
        return [[self.scores[f"{c}@{d:g}"] for c in self.context_lengths] for d in self.depths]

    def by_length(self) -> dict[int, float]:
        """Mean over depths for each context length."""
        return {
            c: sum(self.scores[f"{c}@{d:g}"] for d in self.depths) / len(self.depths) for c in self.context_lengths
        }

    def to_dict(self) -> dict:
        return {
            "context_lengths": self.context_lengths,
            "depths": self.depths,
            "scores": self.scores,
            "by_length": {str(k): v for k, v in self.by_length().items()},
            "mean": sum(self.scores.values()) / max(len(self.scores), 1),
            "samples": self.samples,
        }


@torch.no_grad()
def run_niah(
    model: torch.nn.Module,
    tokenizer,
    context_lengths: Sequence[int] = (2048, 4096, 8192),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    samples_per_cell: int = 1,
    haystack_ids: Sequence[int] | None = None,
    max_new_tokens: int = 12,
    seed: int = 0,
    progress: bool = True,
    desc: str = "niah",
) -> NIAHResult:
    """Greedy-decode every (context length, depth, sample) prompt and score it. The needle values are drawn from
    `seed`, so every model setup gets the same prompts."""
    haystack_ids = essay_haystack_ids(tokenizer) if haystack_ids is None else haystack_ids
    rng = random.Random(seed)
    device = next(model.parameters()).device
    result = NIAHResult(list(context_lengths), [float(d) for d in depths])
    cells = [(c, d) for c in context_lengths for d in depths]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(cells) * samples_per_cell, desc=desc, unit="prompt", disable=not progress) as bar:
            for c, d in cells:
                total = 0.0
                for _ in range(samples_per_cell):
                    value = str(rng.randint(1_000_000, 9_999_999))
                    sample = build_niah_sample(tokenizer, haystack_ids, c, d, value)
                    ids = torch.tensor([sample.input_ids], device=device)
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=pad,
                    )
                    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                    score = score_niah(text, value)
                    total += score
                    result.samples.append(
                        {"context_len": c, "depth": d, "answer": value, "generated": text, "score": score}
                    )
                    bar.update()
                result.scores[f"{c}@{d:g}"] = total / samples_per_cell
    finally:
        model.train(was_training)
    return result


def plot_niah_heatmaps(results: dict[str, NIAHResult | dict], path, *, title: str | None = None):
    """One heatmap panel per setup (depth x context length, green = retrieved), saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(name, r if isinstance(r, dict) else r.to_dict()) for name, r in results.items()]
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items) + 1, 3.6), squeeze=False)
    image = None
    for i_ax, (ax, (name, r)) in enumerate(zip(axes[0], items)):
        lengths, depths = r["context_lengths"], r["depths"]
        grid = [[r["scores"][f"{c}@{float(d):g}"] for c in lengths] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in lengths])
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths] if i_ax == 0 else [])
        ax.set_xlabel("context length")
        ax.set_title(name, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="retrieved")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
