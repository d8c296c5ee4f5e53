"""`SSAController`: the per-model state every converted layer reads (the config, the stream of the current forward
pass, what the layers record), and how to find it on a model (`get_controller`, `require_controller`)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import SSAConfig
from ..ops import select_blocks

__all__ = [
    "SSAController",
    "SSALayerState",
    "get_controller",
    "require_controller",
    "controller_owner",
    "CONFIG_KEY",
]

CONFIG_KEY = "ssa_config"  # where the SSAConfig lives inside the model's config.json
PROBE_ROWS = 64  # query / key rows sampled to recognise a layer's inputs when checkpointing recomputes it


class SSAController:
    """Per-model SSA state shared by all converted layers: the config, the stream of the current forward pass,
    and what the layers recorded (alignment losses, attention statistics)."""

    def __init__(self, config: SSAConfig, base_attn_implementation: str | None, layers: list[int], seed: int = 0):
        self.config = config
        self.base_attn_implementation = base_attn_implementation
        self.layers = layers
        self.stream: str | None = None  # fixed by set_stream(); None draws one per forward pass
        self.kernel_options = None  # KernelOptions for the Triton kernels (set_kernel_options); None: their defaults
        self.drawn: str | None = None  # the stream drawn for the current forward pass
        self.generator = torch.Generator().manual_seed(seed)
        self.align_losses: dict[int, torch.Tensor] = {}
        self.sparsity: dict[int, torch.Tensor] | None = None  # filled while recording statistics
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._per_forward: dict[str, tuple] = {}  # name -> (key, value): computed once per forward for all layers
        self._indices: dict[int, tuple] = {}  # layer -> (input probes, block indices) of this forward pass
        self._trained_selection = config.selection_kwargs()  # of conversion or of the last training pass
        self._set_for_inference: dict[str, int] = {}  # selection fields set_inference changed since then

    def reconfigure(self, config: SSAConfig, *, for_inference: bool = False) -> None:
        """Take `config` as the model's SSAConfig. `for_inference`: the change comes from `set_inference`, so the
        next training pass warns if it trains with a selection changed here."""
        self.config = config
        if for_inference:
            for name, value in config.selection_kwargs().items():
                if value != self._trained_selection[name]:
                    self._set_for_inference[name] = value

    def begin_forward(self, training: bool = False) -> None:
        """Called once per top-level forward pass: forget the last pass's records; draw its stream when SSA training
        has none fixed (here, before any layer, so that compiled code breaks the graph at most once, outside the
        attention). A training pass whose selection differs from the last training pass's because `set_inference`
        changed it warns, once."""
        if training:
            self._warn_inference_selection()
        self.drawn = None
        if training and self.stream is None and self.config.train_mode == "ssa":
            self.drawn = self._draw()
        self.align_losses = {}
        self._per_forward = {}
        self._indices = {}

    def _warn_inference_selection(self) -> None:
        now = self.config.selection_kwargs()
        before, self._trained_selection = self._trained_selection, now
        changed = [k for k, v in self._set_for_inference.items() if now[k] == v != before[k]]
        self._set_for_inference = {}
        if changed:
            what = ", ".join(f"{k}={now[k]} (was {before[k]})" for k in changed)
            back = ", ".join(f"{k}={before[k]}" for k in changed)
            warnings.warn(
                f"ssa_adapt: training with the selection set by set_inference: {what}. Inference and training "
                f"share one selection; to train with the earlier one, call ssa_adapt.set_inference(model, {back}) "
                "first.",
                UserWarning,
                stacklevel=3,
            )

    def training_indices(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, selection: dict) -> torch.Tensor:
        """Block indices [B, T, H, S] of a layer in training, for q [B, T, HQ, D], k [B, TK, H, D].

        Gradient checkpointing runs a layer's forward again during the backward pass: that recomputation reuses
        the indices of the forward pass instead of selecting again (the selection needs no gradient). A layer runs
        once per forward pass otherwise, so seeing the same inputs again in the same pass (strided samples of q and
        k, compared exactly: a recomputation reproduces them bit for bit) identifies the recomputation."""
        if torch.compiler.is_compiling():  # the compiled backward recomputes the (deterministic) selection itself
            return select_blocks(q, k, **selection)
        probes = tuple(x.detach()[:, :: max(1, x.shape[1] // PROBE_ROWS)].float() for x in (q, k))
        cached = self._indices.get(layer_idx)
        if cached is not None and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(cached[0], probes)):
            return cached[1]
        indices = select_blocks(q, k, **selection)
        self._indices[layer_idx] = (probes, indices)
        return indices

    def padding(self, key: tuple, compute) -> tuple:
        """The layers' (doc_start, key_mask): `once_per_forward("padding", key, compute)`; key holds three sizes
        and then tensors."""
        return self.once_per_forward("padding", key, compute, sizes=3)

    def once_per_forward(self, name: str, key: tuple, compute, sizes: int = 0):
        """`compute()` once per forward pass for all layers that ask under `name` (the layers' inputs identify it:
        the first `sizes` entries of `key` compared by value, the rest, tensors or None, by identity); compiled,
        every layer computes it (no state kept, so that checkpointed layers have no side effect)."""
        if torch.compiler.is_compiling():
            return compute()
        cached = self._per_forward.get(name)
        if (
            cached is None
            or len(cached[0]) != len(key)
            or cached[0][:sizes] != key[:sizes]
            or any(a is not b for a, b in zip(cached[0][sizes:], key[sizes:]))
        ):
            cached = self._per_forward[name] = (key, compute())
        return cached[1]

    def training_stream(self) -> str:
        """The stream the residual continues with in SSA training, drawn once per forward pass."""
        if self.stream is not None:
            return self.stream
        if self.drawn is None:  # a layer trained outside the model's forward (begin_forward draws otherwise)
            self.drawn = self._draw()
        return self.drawn

    @torch.compiler.disable
    def _draw(self) -> str:
        """One draw from the controller's generator (a host value: compiled code calls it outside the graph; the
        trainer fixes the stream with set_stream instead, which compiles without a break)."""
        draw = torch.rand((), generator=self.generator).item()
        return "full" if draw < self.config.full_prob else "sparse"


class SSALayerState:
    """What a converted attention module carries: its controller and its layer index."""

    def __init__(self, controller: SSAController, layer_idx: int):
        self.controller = controller
        self.layer_idx = layer_idx


def get_controller(model: nn.Module) -> SSAController | None:
    """The SSAController of a converted model (also found through PEFT wrappers), or None."""
    for module in model.modules():
        ctrl = module.__dict__.get("ssa_controller")
        if ctrl is not None:
            return ctrl
    return None


def require_controller(model: nn.Module) -> SSAController:
    """The SSAController of a converted model; raises with the fix when the model is not converted."""
    ctrl = get_controller(model)
    if ctrl is None:
        raise ValueError(
            "This model has no SSA attention: convert it first with ssa_adapt.convert(model, SSAConfig(...))."
        )
    return ctrl


def controller_owner(model: nn.Module, ctrl: SSAController) -> nn.Module:
    """The module `convert` was called on (the one holding `ctrl`; inside PEFT wrappers, the base model)."""
    return next(m for m in model.modules() if m.__dict__.get("ssa_controller") is ctrl)
