"""Attention statistics per layer and head, measured on a model's real q, k, v: AttnSparsity, dropped mass, and
the paper's Theorem 1 checked token by token.

For a budget (block_size x block_count, sink and local blocks) and each query token t and head:

- AttnSparsity(t) = full causal attention mass inside the blocks SSA selects for t; dropped mass delta = 1 - it.
- Theorem 1: ||o_full(t) - o_sparse(t)|| <= delta(t) * (max_{j visible, not selected} ||v_j|| + ||o_sparse(t)||).
  It holds exactly for softmax attention, so on real activations the check must pass for every token up to
  floating-point slack: a token violates it when err > bound * (1 + rtol) + atol * (||o_full|| + ||o_sparse||)
  (atol is relative to the outputs' size, since the two outputs come from different kernels). `bound_max_excess`
  (max of err - bound, absolute and relative to the outputs' size) says by how much; `bound_max_ratio` (max err /
  bound over tokens whose bound is above float noise) says how tight the bound is.

q, k, v are captured by wrapping the model's attention function (transformers' `AttentionInterface`, whatever
the implementation: sdpa, eager, or SSA's own) for the duration of `measure_attention`. The model itself runs
unchanged, in its current mode: measure a plain model, or a converted one in `full` mode, to get the statistics of
the original attention under a budget; a converted model in `sparse` mode gives those of its sparse activations.
Several budgets are measured in one forward pass. Inputs must be unpadded, unpacked sequences.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..ops import attend_blocks, full_attention, select_blocks
from ..ops.reference import attention_sparsity

__all__ = ["Budget", "measure_attention", "attention_statistics", "theorem1_terms", "summarize"]


@dataclass(frozen=True)
class Budget:
    """A sparse-attention budget: which blocks a query may attend to."""

    block_size: int = 16
    block_count: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1

    @property
    def name(self) -> str:
        return f"{self.block_size}x{self.block_count}-sink{self.sink_blocks}" + (
            f"-local{self.local_blocks}" if self.local_blocks != 1 else ""
        )

    @property
    def receptive_field(self) -> int:
        return self.block_size * self.block_count

    def selection(self) -> dict:
        return dict(
            block_size=self.block_size,
            block_count=self.block_count,
            sink_blocks=self.sink_blocks,
            local_blocks=self.local_blocks,
        )


def _max_unselected_value_norm(v: torch.Tensor, indices: torch.Tensor, block_size: int, chunk: int = 1024):
    """max over visible (key <= t), unselected keys of ||v_j||, per query and KV head: [B, T, H] (0 if none).

    v [B, T, H, D] (queries are the T key positions), indices [B, T, H, S] (-1 = unused slot).
    """
    B, T, H, _ = v.shape
    vnorm = v.float().norm(dim=-1).transpose(1, 2)  # [B, H, T]
    NB = -(-T // block_size)
    keys = torch.arange(T, device=v.device)
    out = torch.zeros(B, T, H, device=v.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        idx = indices[:, t0:t1].long()
        idx = torch.where(idx < 0, NB, idx)
        in_block = torch.zeros(B, t1 - t0, H, NB + 1, dtype=torch.bool, device=v.device).scatter_(-1, idx, True)
        selected = in_block[..., :NB].repeat_interleave(block_size, dim=-1)[..., :T]  # [B, Tc, H, T]
        visible = keys[None, :] <= torch.arange(t0, t1, device=v.device)[:, None]  # [Tc, T]
        dropped = visible[None, :, None, :] & ~selected
        norms = vnorm[:, None, :, :].expand(B, t1 - t0, H, T)
        out[:, t0:t1] = torch.where(dropped, norms, torch.zeros((), device=v.device)).amax(-1)
    return out


def theorem1_terms(
    q, k, v, budget: Budget, *, scale: float | None = None, backend: str = "auto"
) -> dict[str, torch.Tensor]:
    """Per token and head [B, T, HQ]: AttnSparsity, dropped mass, ||o_full - o_sparse|| and the Theorem-1 bound.

    q [B, T, HQ, D], k, v [B, T, H, D] (post-RoPE, one document per row, no cache). `backend` is that of
    `ssa_adapt.ops` for the selection and both attentions; the mass inside the selection is the reference's.
    """
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    scale = D**-0.5 if scale is None else scale
    indices = select_blocks(q, k, scale=scale, backend=backend, **budget.selection())  # [B, T, H, S]
    mass = attention_sparsity(q, k, indices, block_size=budget.block_size, scale=scale).float()  # [B, T, HQ]
    o_full = full_attention(q, k, v, scale=scale, backend=backend).float()
    o_sparse = attend_blocks(q, k, v, indices, block_size=budget.block_size, scale=scale, backend=backend).float()
    delta = (1 - mass).clamp(min=0)
    vmax = _max_unselected_value_norm(v, indices, budget.block_size).repeat_interleave(G, dim=-1)  # [B, T, HQ]
    return {
        "sparsity": mass,
        "dropped": delta,
        "error": (o_full - o_sparse).norm(dim=-1),
        "bound": delta * (vmax + o_sparse.norm(dim=-1)),
        "scale": o_full.norm(dim=-1) + o_sparse.norm(dim=-1),
    }


class _Accumulator:
    """Per-head running sums for one (layer, budget)."""

    def __init__(self, heads: int, receptive_field: int, rtol: float, atol: float):
        self.rf, self.rtol, self.atol = receptive_field, rtol, atol
        z = torch.zeros(heads, dtype=torch.float64)
        self.tokens = 0
        self.tokens_beyond = 0
        self.sparsity, self.sparsity_beyond, self.error, self.bound = z.clone(), z.clone(), z.clone(), z.clone()
        self.violations = z.clone()
        self.max_ratio = z.clone()
        self.max_excess = torch.full((heads,), -float("inf"), dtype=torch.float64)
        self.max_excess_rel = self.max_excess.clone()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        mass, err, bound, scale = (terms[n].detach().double().cpu() for n in ("sparsity", "error", "bound", "scale"))
        B, T, _ = mass.shape
        self.tokens += B * T
        self.sparsity += mass.sum((0, 1))
        beyond = mass[:, self.rf :]
        self.tokens_beyond += beyond.shape[0] * beyond.shape[1]
        self.sparsity_beyond += beyond.sum((0, 1))
        self.error += err.sum((0, 1))
        self.bound += bound.sum((0, 1))
        self.violations += (err > bound * (1 + self.rtol) + self.atol * scale).sum((0, 1))
        excess = err - bound
        self.max_excess = torch.maximum(self.max_excess, excess.amax((0, 1)))
        self.max_excess_rel = torch.maximum(self.max_excess_rel, (excess / scale.clamp(min=1e-30)).amax((0, 1)))
        # tightness, over tokens whose bound is well above float noise (there err / bound can read anything)
        ratio = torch.where(bound > 1e-3, err / bound.clamp(min=1e-30), torch.zeros_like(err))
        self.max_ratio = torch.maximum(self.max_ratio, ratio.amax((0, 1)))

    def result(self) -> dict:
        n, nb = max(self.tokens, 1), max(self.tokens_beyond, 1)
        sparsity = (self.sparsity / n).tolist()
        return {
            "tokens": self.tokens,
            "sparsity": sparsity,
            "dropped": [1 - s for s in sparsity],
            "sparsity_beyond_rf": (self.sparsity_beyond / nb).tolist() if self.tokens_beyond else None,
            "error_mean": (self.error / n).tolist(),
            "bound_mean": (self.bound / n).tolist(),
            "bound_violations": [int(x) for x in self.violations.tolist()],
            "bound_max_ratio": self.max_ratio.tolist(),
            "bound_max_excess": self.max_excess.tolist(),
            "bound_max_excess_rel": self.max_excess_rel.tolist(),
        }


def _eager_default(module: torch.nn.Module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}'s module has no eager_attention_forward to fall back on.")
    return fn


@contextlib.contextmanager
def measure_attention(
    model: torch.nn.Module,
    budgets: Budget | Sequence[Budget],
    *,
    rtol: float = 1e-3,
    atol: float = 1e-5,
    backend: str = "auto",
    layers: Sequence[int] | None = None,
) -> Iterator[dict[str, dict[int, _Accumulator]]]:
    """While active, every forward pass of `model` adds the Theorem-1 terms of each attention layer's real q, k, v
    (or only of `layers`) under each budget. Yields {budget name: {layer: accumulator}}; read it with
    `summarize(...)`."""
    budgets = [budgets] if isinstance(budgets, Budget) else list(budgets)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = base.config._attn_implementation
    owned = {
        id(m)
        for m in base.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "o_proj") and (layers is None or m.layer_idx in layers)
    }
    stats: dict[str, dict[int, _Accumulator]] = {b.name: {} for b in budgets}
    had_local = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous_local = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
    original = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None

    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
        inner = original if original is not None else _eager_default(module)
        out = inner(module, query, key, value, attention_mask, *args, **kwargs)
        if id(module) in owned and query.shape[2] == key.shape[2]:  # no KV cache: one full sequence per row
            q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            with torch.no_grad():
                for b in budgets:
                    acc = stats[b.name].get(module.layer_idx)
                    if acc is None:
                        acc = stats[b.name][module.layer_idx] = _Accumulator(q.shape[2], b.receptive_field, rtol, atol)
                    acc.add(theorem1_terms(q, k, v, b, scale=kwargs.get("scaling"), backend=backend))
        return out

    ALL_ATTENTION_FUNCTIONS[impl] = wrapper
    try:
        yield stats
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS[impl] = previous_local
        else:
            del ALL_ATTENTION_FUNCTIONS[impl]


def summarize(stats: dict[str, dict[int, _Accumulator]]) -> dict[str, dict]:
    """{budget: {"layers": {layer: per-head lists}, "sparsity": mean over layers and heads, ...}}."""
    out = {}
    for name, layers in stats.items():
        per_layer = {layer: acc.result() for layer, acc in sorted(layers.items())}
        heads = [s for r in per_layer.values() for s in r["sparsity"]]
        beyond = [s for r in per_layer.values() for s in (r["sparsity_beyond_rf"] or [])]
        out[name] = {
            "sparsity": sum(heads) / len(heads) if heads else None,
            "dropped": 1 - sum(heads) / len(heads) if heads else None,
            "sparsity_beyond_rf": sum(beyond) / len(beyond) if beyond else None,
            "bound_violations": sum(sum(r["bound_violations"]) for r in per_layer.values()),
            "bound_checks": sum(r["tokens"] * len(r["sparsity"]) for r in per_layer.values()),
            "bound_max_ratio": max((max(r["bound_max_ratio"]) for r in per_layer.values()), default=None),
            "bound_max_excess": max((max(r["bound_max_excess"]) for r in per_layer.values()), default=None),
            "bound_max_excess_rel": max((max(r["bound_max_excess_rel"]) for r in per_layer.values()), default=None),
            "layers": per_layer,
        }
    return out


@torch.no_grad()
def attention_statistics(
    model: torch.nn.Module,
    windows: torch.Tensor,
    budgets: Budget | Sequence[Budget],
    *,
    progress: bool = True,
    backend: str = "auto",
    layers: Sequence[int] | None = None,
) -> dict[str, dict]:
    """Run `model` over `windows` [N, L] (one forward pass per row) and return `summarize(...)` of every budget."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with measure_attention(model, budgets, backend=backend, layers=layers) as stats:
            for row in tqdm(
                windows, desc=f"attention stats @ {windows.shape[1]}", unit="window", disable=not progress
            ):
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        model.train(was_training)
    return summarize(stats)
