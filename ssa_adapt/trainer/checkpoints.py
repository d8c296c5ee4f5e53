"""Which checkpoint a run resumes from, and whether it holds what resuming needs.

transformers' `Trainer._save_checkpoint` writes a `checkpoint-N` folder in order: the model, the optimizer and
scheduler states, the RNG states, and `trainer_state.json` last. A run killed while saving leaves a folder without
a whole `trainer_state.json`: `last_checkpoint` skips it. A checkpoint saved with `save_only_model=True` (or
stripped of its optimizer files) resumes with a fresh optimizer and a restarted schedule: `check_resumable`
refuses it.
"""

from __future__ import annotations

import json
import os
import re
import warnings

__all__ = ["last_checkpoint", "check_resumable"]

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"
SCHEDULER = "scheduler.pt"
_OPTIMIZER = ("optimizer.pt", "optimizer.bin")  # or an `optimizer*` folder (FSDP's sharded state)


def _is_complete(folder: str) -> bool:
    """trainer_state.json, written last, is there and whole."""
    try:
        with open(os.path.join(folder, TRAINER_STATE)) as f:
            return "global_step" in json.load(f)
    except (OSError, ValueError):
        return False


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-N` folder of `output_dir`, or None when it has none. Newer incomplete ones
    (a run killed while saving) are skipped with a warning that names them."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.fullmatch(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    skipped = []
    for _, folder in sorted(found, reverse=True):
        if _is_complete(folder):
            break
        skipped.append(folder)
    else:
        folder = None
    if skipped:
        warnings.warn(
            f"Skipping incomplete checkpoints {skipped} (no whole {TRAINER_STATE}: the run was stopped while saving "
            f"them); resuming from {folder or 'scratch (no complete checkpoint)'}. Delete them to silence this.",
            stacklevel=2,
        )
    return folder


def check_resumable(checkpoint: str, *, deepspeed: bool = False) -> None:
    """Raise when `checkpoint` lacks what resuming restores: the step count (trainer_state.json), the optimizer
    state and the learning-rate schedule (DeepSpeed keeps the last two in its own folder)."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"resume_from_checkpoint={checkpoint!r}: no such folder.")
    missing = [] if _is_complete(checkpoint) else [f"{TRAINER_STATE} (the step count, the logs)"]
    if not deepspeed:
        entries = os.listdir(checkpoint)
        has_optimizer = any(name in entries for name in _OPTIMIZER) or any(
            name.startswith("optimizer") and os.path.isdir(os.path.join(checkpoint, name)) for name in entries
        )
        if not has_optimizer:
            missing.append(f"{_OPTIMIZER[0]} (the optimizer's moments)")
        if SCHEDULER not in entries:
            missing.append(f"{SCHEDULER} (the learning-rate schedule)")
    if missing:
        raise ValueError(
            f"Cannot resume from {checkpoint!r}: it lacks {', '.join(missing)}, so training would restart them (the "
            "loss and the learning rate jump). It was saved with save_only_model=True, or is incomplete. Resume "
            "from a full checkpoint, or start a new run from its weights: --model_name_or_path "
            f"{checkpoint} without --resume_from_checkpoint."
        )
