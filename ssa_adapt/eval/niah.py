"""Needle in a haystack over the Paul Graham essays: build, run (greedy decoding), score, plot.

A sample is `context_len` tokens: the essays (repeated if needed) with needle sentences inserted at sentence
boundaries, then a question whose answer prefix the model completes. Kinds (`KINDS`):

- ``"magic"``: one needle, "The special magic number is NNNNNNN.", near `depth` (0 = start, 1 = end of the
  haystack); the first version of this test, kept for the earlier figures.
- ``"single"``: one keyed needle, "One special magic number for <key> is: NNNNNNN.", where the key is an
  adjective-noun pair from wonderwords' word lists (offline), asked for by key (RULER's single-needle task).
- ``"multikey"``: the keyed needle near `depth` plus three needles of other keys at random depths; the question
  names the first key, so the model must retrieve by key, not by position (RULER's multi-key task).
- ``"multivalue"``: four needles of one key (the first near `depth`, the others at random depths); the question asks
  for all of them and the score is the fraction found (RULER's multi-value task).

A value scores when the generated text contains it as a whole number (not inside a longer digit string). The grid
is context lengths x depths; each cell keeps its mean and a Wilson 95% interval (`binomial_interval`) over its
values; `plot_niah_heatmaps` draws one panel per model setup, `plot_niah_grid` rows of panels (say one per kind).
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = [
    "KINDS",
    "NEEDLE",
    "binomial_interval",
    "build_keyed_sample",
    "QUESTION",
    "NIAHSample",
    "build_niah_sample",
    "score_niah",
    "run_niah",
    "random_keys",
    "score_answers",
    "plot_niah_heatmaps",
    "plot_niah_grid",
    "essay_haystack_ids",
]

NEEDLE = " The special magic number is {value}."
QUESTION = "\n\nWhat is the special magic number mentioned in the text above? The special magic number is"
HEADER = "There is a special magic number hidden in the following text. Remember it.\n\n"

KINDS = ("magic", "single", "multikey", "multivalue")
KEYED_HEADER = "Some special magic numbers are hidden in the following text. Remember them.\n\n"
KEYED_NEEDLE = " One special magic number for {key} is: {value}."
KEYED_QUESTION = (
    "\n\nWhat is the special magic number for {key} in the text above? The special magic number for {key} is"
)
ALL_VALUES_QUESTION = (
    "\n\nWhat are all the special magic numbers for {key} in the text above? The special magic numbers for {key} are"
)
NEEDLES_PER_SAMPLE = 4  # multikey: the asked key and three others; multivalue: four values of one key
MAX_NEW_TOKENS = {"magic": 12, "single": 12, "multikey": 12, "multivalue": 48}


@dataclass
class NIAHSample:
    """One prompt: `input_ids` of exactly `context_len` tokens, the (first) needle at token `needle_start`."""

    input_ids: list[int]
    answer: str  # the value asked for (multivalue: the first of `answers`)
    context_len: int
    depth: float  # requested, as a fraction of the haystack
    needle_start: int  # token index of the needle's first token in input_ids
    haystack_start: int  # token index of the haystack's first token
    haystack_len: int  # haystack tokens (the needle not counted)
    answers: list[str] = field(default_factory=list)  # every value the question asks for (default: [answer])
    kind: str = "magic"
    tokens_before: int = 0  # tokens of other needles between the haystack's start and this needle

    def __post_init__(self):
        if not self.answers:
            self.answers = [self.answer]

    @property
    def actual_depth(self) -> float:
        """Where the needle landed, as a fraction of the haystack."""
        return (self.needle_start - self.haystack_start - self.tokens_before) / max(self.haystack_len, 1)


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


@functools.cache
def _key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) of wonderwords' bundled lists, single lowercase words, profanity removed."""
    from importlib import resources

    try:
        import wonderwords
    except ImportError as e:
        raise ImportError("Keyed needles draw their keys from wonderwords' word lists: pip install wonderwords") from e
    assets = resources.files(wonderwords) / "assets"
    read = lambda name: {w.strip().lower() for w in (assets / name).read_text().splitlines()}  # noqa: E731
    banned = read("profanitylist.txt")
    keep = lambda words: tuple(sorted(w for w in words if w.isalpha() and w not in banned))  # noqa: E731
    return keep(read("adjectivelist.txt")), keep(read("nounlist.txt"))


def random_keys(rng: random.Random, n: int) -> list[str]:
    """`n` distinct adjective-noun keys ("quiet-harbor") drawn with `rng`."""
    adjectives, nouns = _key_words()
    keys: list[str] = []
    while len(keys) < n:
        key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if key not in keys:
            keys.append(key)
    return keys


def build_keyed_sample(
    tokenizer,
    haystack_ids: Sequence[int],
    context_len: int,
    depth: float,
    kind: str,
    rng: random.Random,
    *,
    bos: bool = True,
) -> NIAHSample:
    """A keyed-needle prompt of exactly `context_len` tokens (kind "single", "multikey" or "multivalue", see the
    module docstring): the first needle at the sentence boundary nearest to `depth`, the others at boundaries
    nearest to random depths; keys and seven-digit values drawn with `rng`.

    Layout: [BOS] header | haystack with the needles | question naming the first needle's key.
    """
    if kind not in ("single", "multikey", "multivalue"):
        raise ValueError(f"kind={kind!r}: keyed needles are 'single', 'multikey' or 'multivalue'.")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: use a fraction of the haystack in [0, 1].")
    if not haystack_ids:
        raise ValueError("The haystack is empty.")
    n = 1 if kind == "single" else NEEDLES_PER_SAMPLE
    keys = random_keys(rng, n if kind == "multikey" else 1)
    keys = keys if kind == "multikey" else keys * n
    values = []
    while len(values) < n:
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in values:
            values.append(value)
    depths = [depth] + [rng.random() for _ in range(n - 1)]
    question = (ALL_VALUES_QUESTION if kind == "multivalue" else KEYED_QUESTION).format(key=keys[0])
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    prefix = ([tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []) + enc(KEYED_HEADER)
    needles = [enc(KEYED_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    question_ids = enc(question)
    H = context_len - len(prefix) - sum(map(len, needles)) - len(question_ids)
    if H < 1:
        raise ValueError(
            f"context_len={context_len} leaves no room for a haystack; use at least {context_len - H + 1}."
        )
    hay = (list(haystack_ids) * -(-H // len(haystack_ids)))[:H]
    ends = _sentence_ends(tokenizer, hay) + [H]
    cuts = [min(ends, key=lambda e: (abs(e - d * H), e)) for d in depths]
    # insert from the back so that earlier cut positions stay valid; needles at one cut keep their order
    ids = list(hay)
    for i in sorted(range(n), key=lambda i: (cuts[i], i), reverse=True):
        ids[cuts[i] : cuts[i]] = needles[i]
    before = sum(len(needles[i]) for i in range(n) if (cuts[i], i) < (cuts[0], 0))
    ids = prefix + ids + question_ids
    assert len(ids) == context_len
    answers = values if kind == "multivalue" else values[:1]
    return NIAHSample(
        input_ids=ids,
        answer=values[0],
        context_len=context_len,
        depth=float(depth),
        needle_start=len(prefix) + cuts[0] + before,
        haystack_start=len(prefix),
        haystack_len=H,
        answers=answers,
        kind=kind,
        tokens_before=before,
    )


def binomial_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for z = 1.96) of a success rate from `successes` of `trials`: (low, high)."""
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def score_niah(generated: str, answer: str) -> float:
    """1.0 when `answer` appears in `generated` as a whole number (not inside a longer digit string), else 0.0."""
    return 1.0 if re.search(rf"(?<!\d){re.escape(str(answer))}(?!\d)", generated) else 0.0


def score_answers(generated: str, answers: Sequence[str]) -> int:
    """How many of `answers` appear in `generated` as whole numbers."""
    return sum(int(score_niah(generated, a)) for a in answers)


@dataclass
class NIAHResult:
    """Scores per (context length, depth): the fraction of asked values retrieved, with its Wilson 95% interval
    over `trials` values (samples x values per sample); `samples` keeps each generation."""

    context_lengths: list[int]
    depths: list[float]
    scores: dict[str, float] = field(default_factory=dict)  # "ctx@depth" -> mean score
    samples: list[dict] = field(default_factory=list)
    kind: str = "magic"
    intervals: dict[str, list[float]] = field(default_factory=dict)  # "ctx@depth" -> [low, high]
    trials: dict[str, int] = field(default_factory=dict)  # "ctx@depth" -> values asked for

    def grid(self) -> list[list[float]]:
        """[len(depths)][len(context_lengths)] mean scores."""
        return [[self.scores[f"{c}@{d:g}"] for c in self.context_lengths] for d in self.depths]

    def by_length(self) -> dict[int, float]:
        """Mean over depths for each context length."""
        return {
            c: sum(self.scores[f"{c}@{d:g}"] for d in self.depths) / len(self.depths) for c in self.context_lengths
        }

    def length_intervals(self) -> dict[int, list[float]]:
        """Wilson 95% interval of each context length's retrieval rate over all its depths' values."""
        out = {}
        for c in self.context_lengths:
            cells = [f"{c}@{d:g}" for d in self.depths]
            n = sum(self.trials.get(k, 0) for k in cells)
            hits = sum(self.scores[k] * self.trials.get(k, 0) for k in cells)
            out[c] = list(binomial_interval(hits, n))
        return out

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "context_lengths": self.context_lengths,
            "depths": self.depths,
            "scores": self.scores,
            "intervals": self.intervals,
            "trials": self.trials,
            "by_length": {str(k): v for k, v in self.by_length().items()},
            "by_length_intervals": {str(k): v for k, v in self.length_intervals().items()},
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
    kind: str = "magic",
    batch_size: int = 1,
    haystack_ids: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "niah",
) -> NIAHResult:
    """Greedy-decode every (context length, depth, sample) prompt of `kind` (`KINDS`) and score it, `batch_size`
    prompts per `generate` call (every prompt of a cell has exactly its context length, so batches need no
    padding). Needles are drawn from `seed`, so every model setup gets the same prompts; max_new_tokens: None for
    the kind's default (`MAX_NEW_TOKENS`)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(KINDS)}.")
    if batch_size < 1 or samples_per_cell < 1:
        raise ValueError(f"batch_size={batch_size}, samples_per_cell={samples_per_cell}: both must be at least 1.")
    haystack_ids = essay_haystack_ids(tokenizer) if haystack_ids is None else haystack_ids
    max_new_tokens = MAX_NEW_TOKENS[kind] if max_new_tokens is None else max_new_tokens
    rng = random.Random(seed)
    device = next(model.parameters()).device
    result = NIAHResult(list(context_lengths), [float(d) for d in depths], kind=kind)
    cells = [(c, d) for c in context_lengths for d in depths]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(cells) * samples_per_cell, desc=desc, unit="prompt", disable=not progress) as bar:
            for c, d in cells:
                if kind == "magic":
                    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(samples_per_cell)]
                    batch = [build_niah_sample(tokenizer, haystack_ids, c, d, v) for v in values]
                else:
                    batch = [
                        build_keyed_sample(tokenizer, haystack_ids, c, d, kind, rng) for _ in range(samples_per_cell)
                    ]
                hits = trials = 0
                for i in range(0, len(batch), batch_size):
                    part = batch[i : i + batch_size]
                    ids = torch.tensor([s.input_ids for s in part], device=device)
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=pad,
                    )
                    for sample, row in zip(part, out[:, ids.shape[1] :]):
                        text = tokenizer.decode(row, skip_special_tokens=True)
                        found = score_answers(text, sample.answers)
                        hits, trials = hits + found, trials + len(sample.answers)
                        result.samples.append({"context_len": c, "depth": d, "answer": sample.answer,
                                               "answers": sample.answers, "generated": text,
                                               "score": found / len(sample.answers)})  # fmt: skip
                    bar.update(len(part))
                key = f"{c}@{d:g}"
                result.scores[key] = hits / trials
                result.trials[key] = trials
                result.intervals[key] = list(binomial_interval(hits, trials))
    finally:
        model.train(was_training)
    return result


def plot_niah_heatmaps(results: dict[str, NIAHResult | dict], path, *, title: str | None = None):
    """One heatmap panel per setup (depth x context length, green = retrieved), saved as a PNG at `path`."""
    return plot_niah_grid({"": results}, path, title=title)


def plot_niah_grid(rows: dict[str, dict[str, NIAHResult | dict]], path, *, title: str | None = None):
    """Heatmap panels side by side, one row of panels per entry of `rows` ({row label: {panel title: result}}, say
    one row per needle kind and one panel per model and mode); each panel depth x context length, green =
    retrieved, the cell's rate written in it. Saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns + 1, 3.0 * len(rows) + 0.6), squeeze=False)
    image = None
    for i_row, (ax_row, (row_label, results)) in enumerate(zip(axes, rows.items())):
        for i_ax, ax in enumerate(ax_row):
            if i_ax >= len(results):
                ax.axis("off")
                continue
            name, r = list(results.items())[i_ax]
            r = r if isinstance(r, dict) else r.to_dict()
            lengths, depths = r["context_lengths"], r["depths"]
            grid = [[r["scores"].get(f"{c}@{float(d):g}", float("nan")) for c in lengths] for d in depths]
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in lengths])
            ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths] if i_ax == 0 else [])
            if i_row == len(rows) - 1:
                ax.set_xlabel("context length")
            if i_row == 0 or len({tuple(r) for r in rows.values()}) > 1:  # titles once where the panels repeat
                ax.set_title(name, fontsize=9)
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7)
        ax_row[0].set_ylabel(f"{row_label}\nneedle depth" if row_label else "needle depth")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, label="retrieved")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
