"""Named model setups the evaluations compare: the model as loaded, its full stream, and sparse budgets.

    original               the model without SSA (a converted model is unloaded first)
    full                   converted, full attention (equal to `original` for a retrofit without a gate)
    sparse-16x16-sink1     converted, sparse: block_size 16, block_count 16, 1 sink block (local 1)
    sparse-16x64-sink1-local2

Switching between converted setups only changes the inference config (`set_inference`); no weights move.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SSAConfig
from ..patching.controller import get_controller
from ..patching.convert import convert, set_inference, unload
from .attention_stats import Budget

__all__ = ["EvalSetup", "parse_setup", "parse_setups", "apply_setup", "load_model"]

_SPARSE = re.compile(r"^sparse-(\d+)x(\d+)(?:-sink(\d+))?(?:-local(\d+))?$")


@dataclass(frozen=True)
class EvalSetup:
    name: str
    mode: str  # "original", "full" or "sparse"
    budget: Budget | None = None

    @property
    def label(self) -> str:
        """Human-readable, for tables."""
        if self.mode != "sparse":
            return self.mode
        b = self.budget
        sink = f"{b.sink_blocks} sink" if b.sink_blocks else "no sink"
        local = f", {b.local_blocks} local" if b.local_blocks != 1 else ""
        return f"sparse {b.block_size}x{b.block_count}, {sink}{local}"


def parse_setup(spec: str) -> EvalSetup:
    spec = spec.strip()
    if spec in ("original", "full"):
        return EvalSetup(spec, spec)
    m = _SPARSE.match(spec)
    if not m:
        raise ValueError(
            f"setup {spec!r}: use 'original', 'full' or 'sparse-<block_size>x<block_count>[-sink<n>][-local<n>]' "
            "(e.g. sparse-16x16-sink1)."
        )
    bs, bc, sink, local = m.groups()
    budget = Budget(int(bs), int(bc), int(sink or 0), int(local or 1))
    SSAConfig(**budget.selection())  # validate the combination with SSAConfig's own messages
    return EvalSetup(spec, "sparse", budget)


def parse_setups(specs: Sequence[str]) -> list[EvalSetup]:
    """Setup names -> setups, in order."""
    if isinstance(specs, str):
        raise TypeError(f"parse_setups takes a list of setup names, not the string {specs!r}.")
    return [parse_setup(s) for s in specs]


def apply_setup(model: torch.nn.Module, setup: EvalSetup, *, backend: str | None = None) -> torch.nn.Module:
    """Put `model` into `setup`, in place (convert or unload as needed); returns it. `backend` picks the SSA
    kernels (`auto`, `reference`, `triton`, `fla`); None keeps the model's."""
    converted = get_controller(model) is not None
    if setup.mode == "original":
        if converted:
            unload(model)
        return model
    selection = setup.budget.selection() if setup.budget is not None else {}
    if not converted:
        convert(model, SSAConfig(inference_mode=setup.mode, backend=backend or "auto", **selection))
    else:
        set_inference(model, setup.mode, backend=backend, **selection)
    return model


def load_model(
    path: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    rope_scaling_factor: float | None = None,
    rope_original_max_position_embeddings: int | None = None,
):
    """(model, tokenizer) for evaluation: a converted checkpoint comes back converted, a plain one plain (apply a
    setup to convert it), a PEFT LoRA adapter folder (`adapter_config.json`) merged into its base model (loaded in
    float32, merged, then cast to `dtype`). `path` defaults to SmolLM2-135M-Instruct from
    ``ssa_adapt.assets.smollm2_path()``."""
    from transformers import AutoTokenizer

    from ..modeling import load_causal_lm
    from .perplexity import apply_rope_scaling

    if path is None:
        from ..assets import smollm2_path

        path = str(smollm2_path())
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(load_causal_lm(base, dtype=torch.float32), path).merge_and_unload()
        model = model.to(device=device, dtype=torch_dtype).eval()
    else:
        model = load_causal_lm(path, dtype=torch_dtype).to(device).eval()
    if rope_scaling_factor:
        apply_rope_scaling(
            model, rope_scaling_factor, original_max_position_embeddings=rope_original_max_position_embeddings
        )
    return model, AutoTokenizer.from_pretrained(path)
