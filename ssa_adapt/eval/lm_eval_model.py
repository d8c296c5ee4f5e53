"""The `ssa` model type of lm-eval (0.4.x): HuggingFace's `hf` model with SSA attention.

Importing `ssa_adapt.eval` registers it with lm-eval's model registry (lm-eval itself is never edited). From a
shell, run lm-eval through the wrapper, which imports the registration first and then hands over to lm-eval's CLI
with the same arguments:

    python -m ssa_adapt.eval.lm_eval_cli --model ssa \\
        --model_args pretrained=PATH,inference_mode=sparse,block_size=16,block_count=16,sink_blocks=1 \\
        --tasks hellaswag --batch_size 8

From Python: ``import ssa_adapt.eval`` then ``lm_eval.simple_evaluate(model="ssa", model_args=...)``, or build
``SSALM(pretrained=model_or_path, tokenizer=..., ...)`` and pass it as ``model=``.

`pretrained` may be a converted checkpoint (its `config.json` carries `ssa_config`), a plain Llama / Mistral /
Qwen2 / Qwen3 checkpoint (converted on load with `SSAConfig()` plus the arguments given), or an already-loaded
model. The SSA arguments (`inference_mode`, `block_size`, `block_count`, `sink_blocks`, `local_blocks`, `backend`)
override the checkpoint's own; `rope_scaling_factor` (with `rope_original_max_position_embeddings`) applies
llama3-type RoPE scaling for length extrapolation. Every other argument is the `hf` model's.
"""

from __future__ import annotations

import logging

import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import SSAConfig
from ..local_paths import require_local_path
from ..modeling import AutoSSAModelForCausalLM
from ..patching.controller import get_controller
from ..patching.convert import convert, reconfigure
from .perplexity import apply_rope_scaling

__all__ = ["SSALM"]

logger = logging.getLogger(__name__)


class _SSALoader:
    """Stands in for `AutoModelForCausalLM` inside HFLM's loader: loads and converts with the SSA overrides."""

    def __init__(self, overrides: dict):
        self.overrides = overrides

    def from_pretrained(self, path, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if not (k in ("gguf_file", "quantization_config") and v is None)}
        return AutoSSAModelForCausalLM.from_pretrained(path, ssa_overrides=self.overrides, **kwargs)


@register_model("ssa")
class SSALM(HFLM):
    """lm-eval's `hf` model with SSA attention; see the module docstring for the arguments."""

    def __init__(
        self,
        pretrained="",
        *,
        inference_mode: str | None = None,
        block_size: int | None = None,
        block_count: int | None = None,
        sink_blocks: int | None = None,
        local_blocks: int | None = None,
        backend: str | None = None,
        rope_scaling_factor: float | None = None,
        rope_original_max_position_embeddings: int | None = None,
        **kwargs,
    ) -> None:
        given = dict(
            inference_mode=inference_mode,
            block_size=block_size,
            block_count=block_count,
            sink_blocks=sink_blocks,
            local_blocks=local_blocks,
            backend=backend,
        )
        self._ssa_overrides = {k: v for k, v in given.items() if v is not None}
        for name in ("block_size", "block_count", "sink_blocks", "local_blocks"):
            if name in self._ssa_overrides:
                self._ssa_overrides[name] = int(self._ssa_overrides[name])
        self._rope = (rope_scaling_factor, rope_original_max_position_embeddings)
        if not pretrained:
            raise ValueError(
                "The ssa model needs pretrained=PATH (a converted or plain checkpoint) or a loaded model."
            )
        if isinstance(pretrained, str):  # before HFLM reads its config (a missing folder would read as a Hub id)
            require_local_path(pretrained, "model")
        if isinstance(pretrained, transformers.PreTrainedModel):
            self._prepare_loaded(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        ctrl = get_controller(self.model)
        logger.info("ssa: %s", ctrl.config if ctrl is not None else "model not converted")

    def _prepare_loaded(self, model) -> None:
        """Convert an already-loaded plain model, or apply the overrides to a converted one."""
        if get_controller(model) is None:
            convert(model, SSAConfig().replace(**self._ssa_overrides))
        elif self._ssa_overrides:
            reconfigure(model, **self._ssa_overrides)
        self._apply_rope(model)

    def _apply_rope(self, model) -> None:
        factor, original = self._rope
        if factor is not None and float(factor) != 1.0:
            params = apply_rope_scaling(model, float(factor), original_max_position_embeddings=original)
            logger.info("ssa: RoPE scaling %s", params)

    def _create_model(self, pretrained, *args, **kwargs) -> None:
        default_class = self.AUTO_MODEL_CLASS
        if default_class is not transformers.AutoModelForCausalLM:
            raise ValueError("The ssa model evaluates causal LMs only (backend='causal').")
        self.AUTO_MODEL_CLASS = _SSALoader(self._ssa_overrides)
        try:
            super()._create_model(pretrained, *args, **kwargs)
        finally:
            self.AUTO_MODEL_CLASS = default_class
        self._apply_rope(self._model)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        ctrl = get_controller(self.model)
        if ctrl is not None:
            info["ssa_config"] = ctrl.config.to_dict()
        return info
