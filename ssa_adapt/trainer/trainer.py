"""`SSATrainer`: TRL's `SFTTrainer` training with the SSA objective.

Per micro-batch: draw the stream (`draw_stream`, the same on every rank), run the forward with it, and return
`CE + align_weight * L_align`. Logged through the trainer's own metrics: `lm_loss`, `align_loss`,
`full_stream_fraction` and, every `attn_sparsity_steps` steps, `attn_sparsity`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np
import torch
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTConfig, SFTTrainer

from ..modeling import AutoSSAModelForCausalLM
from ..patching.controller import get_controller
from ..patching.convert import alignment_loss, convert, reconfigure, record_attention_sparsity, set_stream
from .checkpoints import check_resumable, last_checkpoint
from .config import SSATrainingConfig

__all__ = ["SSATrainer", "draw_stream"]


def draw_stream(seed: int, step: int, micro_step: int, full_prob: float) -> str:
    """The stream ('full' or 'sparse') of micro-batch `micro_step` of optimizer step `step`.

    A function of its arguments alone (not of the rank, nor of any generator's state): every data-parallel rank
    draws the same stream for the same micro-step, and a run resumed at step s draws what the first run drew.
    'full' with probability `full_prob`.
    """
    u = np.random.default_rng([seed, step, micro_step]).random()
    return "full" if u < full_prob else "sparse"


def _load_model(name: str, args: SSATrainingConfig) -> PreTrainedModel:
    """Load `name` (folder or Hub id) converted with the SSA fields of `args` over its saved SSAConfig, if any."""
    kwargs = dict(args.model_init_kwargs or {})
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"model_init_kwargs dtype={dtype!r}: use 'auto', 'bfloat16', 'float16' or 'float32'.")
        kwargs["dtype"] = getattr(torch, dtype)
    return AutoSSAModelForCausalLM.from_pretrained(name, ssa_overrides=args.ssa_overrides(), **kwargs)


def _prepare_model(model: PreTrainedModel, args: SSATrainingConfig) -> PreTrainedModel:
    """Convert a plain model (or the base of a PEFT model) with the SSA fields of `args`, or apply those fields to
    an already converted one."""
    if get_controller(model) is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        convert(base, args.to_ssa_config(), seed=args.seed)
    elif args.ssa_overrides():
        reconfigure(model, **args.ssa_overrides())
    return model


class _DropMessage(logging.Filter):
    """Drops the log records that contain `text` (a message that is not true for SSATrainer)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


class SSATrainer(SFTTrainer):
    """Continued pretraining (or fine-tuning) of a causal LM with SSA attention: TRL's `SFTTrainer` with the SSA
    objective `loss = CE + align_weight * L_align` and stochastic streams, as the paper trains.

    Args:
        model: a model name (local folder or Hub id; a checkpoint saved after conversion loads converted), a
            plain `PreTrainedModel` (converted in place with the SSA fields of `args`), a converted one, or a
            PEFT model around either.
        args: an `SSATrainingConfig` (an `SFTConfig` or `TrainingArguments` is turned into one, SSA fields unset).
        peft_config, train_dataset, processing_class, ...: as for `SFTTrainer` (packing, padding-free,
            streaming datasets and LoRA work the same way). PEFT freezes the SSA gate (`ssa_gate`) unless it
            is in `modules_to_save`.

    Each training micro-batch continues with the stream `draw_stream(seed, step, micro_step, full_prob)`, fixed
    with `ssa_adapt.set_stream` before the forward. Evaluation uses the model's `inference_mode` stream.
    `train(resume_from_checkpoint="last")` resumes from the newest complete checkpoint of `output_dir`.
    """

    _tag_names = ["trl", "sft", "ssa"]
    _name = "SSA"

    def __init__(self, model, args: SSATrainingConfig | SFTConfig | TrainingArguments | None = None, *a, **kw):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = SSATrainingConfig(f"{str(model_name).rstrip('/').split('/')[-1]}-SSA")
        elif not isinstance(args, SSATrainingConfig):  # its values as they are (to_dict masks the *_token ones)
            known = {f.name for f in dataclasses.fields(SSATrainingConfig) if f.init}
            args = SSATrainingConfig(
                **{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name in known}
            )
        from_name = isinstance(model, str)
        model = _load_model(model, args) if from_name else _prepare_model(model, args)
        self._draw_at = (-1, -1)  # (optimizer step, micro-batch index) of the last draw
        # SFTTrainer would log that model_init_kwargs are ignored: _load_model has used them
        quiet = _DropMessage("You passed `model_init_kwargs`") if from_name else logging.Filter()
        sft_logger = logging.getLogger(SFTTrainer.__module__)
        sft_logger.addFilter(quiet)
        try:
            super().__init__(model, args, *a, **kw)
        finally:
            sft_logger.removeFilter(quiet)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, resuming only from a checkpoint that holds everything resuming restores (see
        `check_resumable`). `resume_from_checkpoint="last"` (or True) picks the newest complete checkpoint of
        `output_dir`, skipping incomplete ones; with none, "last" starts anew and True raises."""
        if resume_from_checkpoint in ("last", True):
            found = last_checkpoint(self.args.output_dir)
            if found is None and resume_from_checkpoint is True:
                raise ValueError(f"No complete checkpoint in output_dir={self.args.output_dir!r} to resume from.")
            resume_from_checkpoint = found
        if isinstance(resume_from_checkpoint, str):
            check_resumable(resume_from_checkpoint, deepspeed=self.is_deepspeed_enabled)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _next_micro_step(self) -> tuple[int, int]:
        step, micro = self._draw_at
        step_now = self.state.global_step
        self._draw_at = (step_now, micro + 1 if step_now == step else 0)
        return self._draw_at

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        ctrl = get_controller(self.model)
        config = ctrl.config
        step, micro = self._next_micro_step()
        if config.train_mode == "ssa":
            stream = draw_stream(self.args.seed, step, micro, config.full_prob)
            set_stream(self.model, stream)
        else:
            stream = config.train_mode
        every = self.args.attn_sparsity_steps
        measure = every > 0 and micro == 0 and step % every == 0
        with record_attention_sparsity(self.model) if measure else contextlib.nullcontext() as sparsity:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result

        # With `num_items_in_batch` the CE is already normalized over the whole accumulated batch (and Trainer
        # will not divide it by the accumulation steps); the alignment, a per-micro-batch mean, must be divided.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        metrics = self._metrics["train"]
        gather = self.accelerator.gather_for_metrics
        metrics["lm_loss"].append(gather(loss.detach() * steps).mean().item())
        align = alignment_loss(self.model) if config.train_mode == "ssa" else None
        if align is not None:
            loss = loss + config.align_weight * align.to(loss.device) / steps
            metrics["align_loss"].append(gather(align.detach().to(loss.device)).mean().item())
        metrics["full_stream_fraction"].append(1.0 if stream == "full" else 0.0)
        if measure and sparsity:
            mean = torch.stack([v.float().to(loss.device) for v in sparsity.values()]).mean()
            metrics["attn_sparsity"].append(gather(mean).mean().item())
        return (loss, result[1]) if return_outputs else loss
