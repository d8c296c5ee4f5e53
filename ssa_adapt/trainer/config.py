"""`SSATrainingConfig`: TRL's `SFTConfig` plus the fields of SSA training (the paper's objective)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from ..compat import checkpointing_prefix, hand_over_checkpointing
from ..config import SSAConfig

__all__ = ["SSATrainingConfig", "SSA_FIELDS"]

# Every field of SSAConfig is also a field of SSATrainingConfig, under the same name, unset (None) by default.
SSA_FIELDS = tuple(f.name for f in dataclasses.fields(SSAConfig))
# Fields whose value can be checked on its own (no constraint ties them to another field).
_SELF_CONTAINED = ("inference_mode", "train_mode", "gate", "full_prob", "align_weight", "align_loss", "backend")


def _ssa_field(source: dataclasses.Field) -> Any:
    default = source.default if source.default is not dataclasses.MISSING else None
    return field(
        default=None,
        metadata={
            "help": f"SSA: {source.metadata['help']} Unset: the converted model's own value, or {default!r} when the "
            "trainer converts the model."
        },
    )


# Generated from SSAConfig so that the two never drift apart; the annotations must be real types for the parser.
_SSA_TYPES = typing.get_type_hints(SSAConfig)
_SSAFields = dataclasses.make_dataclass(
    "_SSAFields",
    [(f.name, _SSA_TYPES[f.name] | None, _ssa_field(f)) for f in dataclasses.fields(SSAConfig)],
)


@dataclass
class SSATrainingConfig(_SSAFields, SFTConfig):
    """Configuration of `SSATrainer`: every field of `SFTConfig`, every field of `SSAConfig` (`block_size`,
    `block_count`, `sink_blocks`, `local_blocks`, `gate`, `inference_mode`, `train_mode`, `full_prob`,
    `align_weight`, `align_loss`, `layers`, `backend`, ...) under the same names, and `attn_sparsity_steps`.

    The SSA fields default to unset (None). Given a plain model, the trainer converts it with `SSAConfig` built from
    the fields that are set (SSAConfig's defaults for the others). Given an already converted model (or a checkpoint
    saved after conversion), the fields that are set replace the model's own; `gate` and `layers` must then match,
    since they decide which weights exist.

    The stream of each micro-batch is drawn from `seed`, the optimizer step and the micro-batch's index within it,
    so every data-parallel rank draws the same stream and a resumed run draws what the first run would have drawn.

    To take the SSA fields from an `SSAConfig`: `SSATrainingConfig(output_dir, **ssa_config.to_dict(), ...)`.
    """

    attn_sparsity_steps: int = field(
        default=0,
        metadata={
            "help": "Every this many optimizer steps, the step's first micro-batch also measures AttnSparsity (full "
            "attention mass inside the selected blocks, no gradient) and logs its mean over layers as "
            "`attn_sparsity`. 0 turns it off (it costs about one extra attention pass)."
        },
    )

    def __post_init__(self):
        hand_over_checkpointing(self)
        super().__post_init__()
        # The choices and ranges are SSAConfig's own checks (the combined ones wait for the model's config).
        SSAConfig(**{k: getattr(self, k) for k in _SELF_CONTAINED if getattr(self, k) is not None})
        if self.attn_sparsity_steps < 0:
            raise ValueError(
                f"attn_sparsity_steps={self.attn_sparsity_steps}: use a step interval >= 1, or 0 for none."
            )
        prefix = checkpointing_prefix(self)
        if getattr(self, f"{prefix}_checkpointing"):
            kwargs = dict(getattr(self, f"{prefix}_checkpointing_kwargs") or {})
            if kwargs.get("use_reentrant") and self.train_mode in (None, "ssa"):
                raise ValueError(
                    f"{prefix}_checkpointing_kwargs={{'use_reentrant': True}} leaves SSA's alignment loss without a "
                    "gradient (reentrant checkpointing reruns the forward without grad). Use {'use_reentrant': False}."
                )
            kwargs.setdefault("use_reentrant", False)
            self.gradient_checkpointing_kwargs = kwargs
            if prefix == "activation":
                self.activation_checkpointing_kwargs = kwargs

    def ssa_overrides(self) -> dict[str, Any]:
        """The SSA fields that are set, {name: value}."""
        return {name: getattr(self, name) for name in SSA_FIELDS if getattr(self, name) is not None}

    def to_ssa_config(self, base: SSAConfig | None = None) -> SSAConfig:
        """`base` (default: `SSAConfig()`) with the SSA fields that are set applied, validated."""
        overrides = self.ssa_overrides()
        return base.replace(**overrides) if base is not None else SSAConfig(**overrides)
