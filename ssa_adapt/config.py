"""`SSAConfig`: everything that defines a model's SSA attention, saved with the model in `config.json`."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

INFERENCE_MODES = ("sparse", "full")
TRAIN_MODES = ("ssa", "full", "sparse", "nsa")
ALIGN_LOSSES = ("smooth_l1", "l2")
BACKENDS = ("auto", "reference", "triton", "fla")
SELECTION_FIELDS = ("block_size", "block_count", "sink_blocks", "local_blocks")  # what decides the selected blocks
STRUCTURAL_FIELDS = ("gate", "layers")  # what decides which weights and converted layers exist


@dataclass
class SSAConfig:
    """Configuration of SSA attention (block selection, streams, training objective, kernel backend).

    The defaults are those of a retrofit of a pretrained model: 16 x 16 blocks (a receptive field of 256 tokens),
    one sink block (pretrained models park attention on the first tokens), no gate (so conversion does not
    change the model's function in full mode).
    """

    block_size: int = field(
        default=16, metadata={"help": "Tokens per key block (BS). Block j holds positions [j*BS, (j+1)*BS)."}
    )
    block_count: int = field(
        default=16,
        metadata={
            "help": "Blocks each query attends to in the sparse stream, forced blocks included (receptive field = block_size * block_count)."
        },
    )
    sink_blocks: int = field(
        default=1,
        metadata={
            "help": "Leading blocks always selected (attention sinks). 1 for retrofits, 0 in the paper's from-scratch runs."
        },
    )
    local_blocks: int = field(
        default=1, metadata={"help": "Most recent blocks, ending with the query's own block, always selected (>= 1)."}
    )
    gate: bool = field(
        default=False,
        metadata={
            "help": "Add a per-head output gate sigmoid(Linear(hidden, HQ)) named `ssa_gate` (the paper's from-scratch models have it). Changes the function of a pretrained model."
        },
    )
    inference_mode: str = field(
        default="sparse", metadata={"help": f"Stream used in eval mode: one of {INFERENCE_MODES}."}
    )
    train_mode: str = field(
        default="ssa",
        metadata={
            "help": f"Training objective, one of {TRAIN_MODES}: ssa (both streams, drawn mode, alignment loss), full (Full-Full), sparse (Sparse-Sparse / MoBA), nsa."
        },
    )
    full_prob: float = field(
        default=0.5,
        metadata={
            "help": "Probability that a training forward pass continues with the full stream (train_mode='ssa')."
        },
    )
    align_weight: float = field(
        default=10.0, metadata={"help": "alpha in loss = CE + alpha * L_align (train_mode='ssa')."}
    )
    align_loss: str = field(
        default="smooth_l1", metadata={"help": f"Distance between the two streams' outputs: one of {ALIGN_LOSSES}."}
    )
    nsa_window: int = field(
        default=128,
        metadata={"help": "Sliding-window length of the NSA baseline's window branch (train_mode='nsa')."},
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of the decoder layers to convert; None converts every full-attention layer."},
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": f"Kernel backend, one of {BACKENDS}: auto (Triton on CUDA, PyTorch reference on CPU), reference, triton, fla."
        },
    )

    def __post_init__(self) -> None:
        for name in ("block_size", "block_count", "local_blocks", "nsa_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SSAConfig.{name}={value!r}: must be an integer >= 1.")
        if not isinstance(self.sink_blocks, int) or isinstance(self.sink_blocks, bool) or self.sink_blocks < 0:
            raise ValueError(
                f"SSAConfig.sink_blocks={self.sink_blocks!r}: must be an integer >= 0 (0 disables sink blocks)."
            )
        if self.sink_blocks + self.local_blocks > self.block_count:
            raise ValueError(
                f"SSAConfig: sink_blocks ({self.sink_blocks}) + local_blocks ({self.local_blocks}) exceed block_count "
                f"({self.block_count}); raise block_count or lower the forced blocks so some blocks are chosen by score."
            )
        _check_choice("inference_mode", self.inference_mode, INFERENCE_MODES)
        _check_choice("train_mode", self.train_mode, TRAIN_MODES)
        _check_choice("align_loss", self.align_loss, ALIGN_LOSSES)
        _check_choice("backend", self.backend, BACKENDS)
        if not isinstance(self.gate, bool):
            raise ValueError(
                f"SSAConfig.gate={self.gate!r}: must be True or False (a bool, not {type(self.gate).__name__})."
            )
        _check_number("full_prob", self.full_prob, "a probability in [0, 1] (0.5 is the paper's choice)")
        if not 0.0 <= self.full_prob <= 1.0:
            raise ValueError(
                f"SSAConfig.full_prob={self.full_prob!r}: must lie in [0, 1] (0.5 is the paper's choice)."
            )
        _check_number("align_weight", self.align_weight, "a finite number >= 0 (10 is the paper's choice)")
        if self.align_weight < 0:
            raise ValueError(f"SSAConfig.align_weight={self.align_weight!r}: must be >= 0 (10 is the paper's choice).")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple, range)):
                raise ValueError(
                    f"SSAConfig.layers={self.layers!r}: give a list of layer indices (layers=[{self.layers!r}] for "
                    "one layer), or None for all layers."
                )
            layers = list(self.layers)
            bad = not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers)
            if bad or len(set(layers)) != len(layers):
                raise ValueError(
                    f"SSAConfig.layers={self.layers!r}: give distinct non-negative layer indices, or None for all layers."
                )
            self.layers = sorted(layers)

    @property
    def receptive_field(self) -> int:
        """Tokens a sparse query can see at most: block_size * block_count."""
        return self.block_size * self.block_count

    def selection_kwargs(self) -> dict[str, int]:
        """{block_size, block_count, sink_blocks, local_blocks}: the keyword arguments of the selection ops
        (`ssa_adapt.ops.select_blocks`, `sparse_attention`)."""
        return {name: getattr(self, name) for name in SELECTION_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SSAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SSAConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    def replace(self, **changes: Any) -> SSAConfig:
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SSAConfig.{name}={value!r}: must be one of {list(choices)}.")


def _check_number(name: str, value: Any, what: str) -> None:
    """A real, finite number (bools and strings are refused: '0.5' would fail later, inside training)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"SSAConfig.{name}={value!r}: must be {what}, given as a number.")
