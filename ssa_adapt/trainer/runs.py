"""A training run made in several calls, each under a time budget (a machine lent for minutes at a time):
`TimeBudgetCallback` stops a call at a step boundary with a checkpoint, the next call resumes from it
(`resume_from_checkpoint="last"`), and `run_summary` describes the finished run."""

from __future__ import annotations

import time

from transformers import Trainer, TrainerCallback

__all__ = ["TimeBudgetCallback", "run_summary"]


class TimeBudgetCallback(TrainerCallback):
    """Saves a checkpoint and stops training at the first step end `budget_s` seconds after `start` (a
    `time.monotonic()` reading; default: when the callback is made, so loading and tokenizing count too). `stopped`
    says whether it did; None as the budget never stops."""

    def __init__(self, budget_s: float | None, start: float | None = None):
        self.budget_s = budget_s
        self.start = time.monotonic() if start is None else start
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        late = self.budget_s is not None and time.monotonic() - self.start > self.budget_s
        if late and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True


def run_summary(trainer: Trainer, *, tail: int = 5) -> dict:
    """The finished run of `trainer`: steps, tokens (per device batch x accumulation x max_length x processes),
    the mean loss and language-model loss of the last `tail` logged steps, and the log history of losses and
    AttnSparsity."""
    state, args = trainer.state, trainer.args
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens_per_step *= getattr(args, "max_length", None) or 0
    last = [h for h in state.log_history if "loss" in h][-tail:]
    return {
        "steps": state.global_step,
        "tokens_per_step": tokens_per_step,
        "tokens": tokens_per_step * state.global_step,
        "final_loss": sum(h["loss"] for h in last) / len(last) if last else None,
        "final_lm_loss": sum(h.get("lm_loss", h["loss"]) for h in last) / len(last) if last else None,
        "log_history": [h for h in state.log_history if "loss" in h or "attn_sparsity" in h],
        "ssa": args.ssa_overrides() if hasattr(args, "ssa_overrides") else None,
    }
