"""`AutoSSAModelForCausalLM`: load a converted checkpoint (local folder or Hub id), or convert a plain one."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import cached_file

from .config import SSAConfig
from .patching.convert import CONFIG_KEY, convert

__all__ = ["AutoSSAModelForCausalLM"]

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


@contextlib.contextmanager
def _ignore_ssa_weights_on_load(model_cls: type):
    """The gate weights (`ssa_*`) are loaded after conversion; keep transformers from reporting them as unused."""
    previous = getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None)
    model_cls._keys_to_ignore_on_load_unexpected = [*(previous or []), r"\.ssa_"]
    try:
        yield
    finally:
        model_cls._keys_to_ignore_on_load_unexpected = previous


def _load_ssa_weights(model: torch.nn.Module, path: str, hub_kwargs: dict[str, Any]) -> None:
    """Copy the `ssa_*` tensors of a safetensors checkpoint (single file or sharded) into the converted model."""
    wanted = {name: p for name, p in model.named_parameters() if ".ssa_" in name}
    if not wanted:
        return
    index = cached_file(
        path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {weight_map[name] for name in wanted if name in weight_map}
    else:
        files = {"model.safetensors"}
    found = set()
    for filename in sorted(files):
        local = cached_file(path, filename, **hub_kwargs)
        with safe_open(local, framework="pt") as f:
            for name in f.keys():
                if name in wanted:
                    with torch.no_grad():
                        wanted[name].copy_(f.get_tensor(name))
                    found.add(name)
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(
            f"The checkpoint at {path!r} lacks the SSA gate weights {missing[:4]}{'...' if len(missing) > 4 else ''}."
        )


class AutoSSAModelForCausalLM:
    """Loads SSA models the way `AutoModelForCausalLM` loads plain ones.

    `from_pretrained(path_or_hub_id)` rebuilds a model saved after `ssa_adapt.convert` (its `config.json`
    carries `ssa_config`). Given a plain checkpoint, pass `ssa_config=SSAConfig(...)` to convert it on load.
    Other keyword arguments go to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, ...).
    """

    def __init__(self, *args, **kwargs):
        raise OSError("Use AutoSSAModelForCausalLM.from_pretrained(path_or_hub_id).")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, *, ssa_config: SSAConfig | dict | None = None, **kwargs: Any
    ) -> torch.nn.Module:
        path = str(pretrained_model_name_or_path)
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, **hub_kwargs)
        saved = getattr(config, CONFIG_KEY, None)
        if isinstance(ssa_config, dict):
            ssa_config = SSAConfig.from_dict(ssa_config)
        if ssa_config is None:
            if saved is None:
                raise ValueError(
                    f"{path!r} is a plain checkpoint (its config has no {CONFIG_KEY!r}); pass ssa_config=SSAConfig(...) "
                    "to convert it while loading."
                )
            ssa_config = SSAConfig.from_dict(saved)
        if saved is not None:
            delattr(config, CONFIG_KEY)  # convert() writes it back
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        with _ignore_ssa_weights_on_load(model_cls):
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
        convert(model, ssa_config)
        if saved is not None and ssa_config.gate:
            _load_ssa_weights(model, path, hub_kwargs)
        return model
