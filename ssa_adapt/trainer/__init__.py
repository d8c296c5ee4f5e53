"""SSA training through TRL: `SSATrainingConfig` (an `SFTConfig` with SSA's fields) and `SSATrainer` (an
`SFTTrainer` with stochastic streams and the alignment loss). Needs the `train` extra: trl, datasets, peft."""

from .checkpoints import check_resumable, last_checkpoint
from .config import SSATrainingConfig
from .data import load_text_dataset, resolve_model_name
from .trainer import SSATrainer, draw_stream

__all__ = [
    "SSATrainingConfig",
    "SSATrainer",
    "draw_stream",
    "load_text_dataset",
    "resolve_model_name",
    "last_checkpoint",
    "check_resumable",
]
