"""Loading: `load_causal_lm`, the one way to load a checkpoint (local folder or Hub id) converted or plain, with SSA
overrides; `AutoSSAModelForCausalLM`, the same for models that must come back converted."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import cached_file

from .config import STRUCTURAL_FIELDS, SSAConfig
from .local_paths import require_local_path
from .patching.controller import CONFIG_KEY
from .patching.convert import convert

__all__ = ["AutoSSAModelForCausalLM", "load_causal_lm"]

_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "local_files_only",
    "subfolder",
    "trust_remote_code",
)


@contextlib.contextmanager
def _ignore_ssa_weights_on_load(model_cls: type):
    """The gate weights (`ssa_*`) are loaded after conversion; keep transformers from reporting them as unused."""
    previous = getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None)
    model_cls._keys_to_ignore_on_load_unexpected = [*(previous or []), r"\.ssa_"]
    try:
        yield
    finally:
        model_cls._keys_to_ignore_on_load_unexpected = previous


def _stored_ssa_tensors(path: str, hub_kwargs: dict[str, Any]) -> dict[str, str] | None:
    """{name: safetensors file} of the checkpoint's `ssa_*` tensors (single file or sharded); None when the
    checkpoint has no safetensors weights."""
    index = cached_file(
        path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: file for name, file in weight_map.items() if ".ssa_" in name}
    local = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if local is None:
        return None
    with safe_open(local, framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys() if ".ssa_" in name}


def _listed(names) -> str:
    names = sorted(names)
    return f"{names[:3]}{' ...' if len(names) > 3 else ''} ({len(names)} tensors)"


def _load_ssa_weights(
    model: torch.nn.Module, path: str, hub_kwargs: dict[str, Any], config: SSAConfig, saved: dict | None
) -> None:
    """Copy the checkpoint's `ssa_*` tensors (the gates) into the converted model; refuse when the checkpoint's
    gate weights and the SSAConfig it is loaded with disagree (a dropped or fresh gate changes the outputs)."""
    wanted = {name: p for name, p in model.named_parameters() if ".ssa_" in name}
    stored = _stored_ssa_tensors(path, hub_kwargs)
    if stored is None:  # no safetensors: nothing to compare with (transformers loaded the other weights)
        if wanted and saved is not None:
            raise ValueError(f"{path!r} has no model.safetensors; the SSA gate weights load from safetensors only.")
        return
    source = "the ssa_config passed" if saved is None or config.to_dict() != saved else "its config.json's ssa_config"
    if stored and not wanted:
        raise ValueError(
            f"{path!r} holds trained SSA gate weights {_listed(stored)}, but {source} has gate=False "
            f"(train_mode={config.train_mode!r}): loading would drop them and change the model's outputs. Load it "
            "with gate=True (leave ssa_config unset to use the checkpoint's own), or fix its config.json."
        )
    if wanted and saved is not None and not stored:
        raise ValueError(
            f"{source.capitalize()} of {path!r} asks for SSA gates (gate=True or train_mode='nsa'), but the "
            "checkpoint holds no ssa_gate weights: fresh gates would change the model's outputs. Load it with "
            "gate=False, or convert the plain model with gate=True to train new gates."
        )
    if saved is None and not stored:
        return  # a plain checkpoint converted on load with new gates
    missing, unexpected = set(wanted) - set(stored), set(stored) - set(wanted)
    if missing or unexpected:
        raise ValueError(
            f"The SSA gate weights of {path!r} do not match the converted layers ({source}, layers="
            f"{config.layers!r}): missing {_listed(missing)}, unexpected {_listed(unexpected)}. Load it with the "
            "ssa_config it was saved with."
        )
    for filename in sorted(set(stored.values())):
        local = cached_file(path, filename, **hub_kwargs)
        with safe_open(local, framework="pt") as f:
            for name in f.keys():
                if name in wanted:
                    tensor = f.get_tensor(name)
                    if tensor.shape != wanted[name].shape:
                        raise ValueError(
                            f"{path!r}: {name} is {tuple(tensor.shape)} but {source} (gate={config.gate}, "
                            f"train_mode={config.train_mode!r}) builds {tuple(wanted[name].shape)}; load it with the "
                            "ssa_config it was saved with."
                        )
                    with torch.no_grad():
                        wanted[name].copy_(tensor)


def _check_structure(saved: SSAConfig, new: SSAConfig, path: str) -> None:
    for name in STRUCTURAL_FIELDS:
        if getattr(saved, name) != getattr(new, name):
            raise ValueError(
                f"{path} was converted with {name}={getattr(saved, name)!r}; the overrides ask for "
                f"{name}={getattr(new, name)!r}, which would change its weights. Leave {name} unset, or start from "
                "the plain model."
            )


def load_causal_lm(
    path: str,
    *,
    ssa_config: SSAConfig | dict | None = None,
    ssa_overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a causal LM (local folder or Hub id) with or without SSA.

    A checkpoint saved after `convert` (its `config.json` carries `ssa_config`) comes back converted with its own
    SSAConfig; a plain one comes back plain. `ssa_overrides` ({SSAConfig field: value}, possibly empty) are applied
    over the checkpoint's SSAConfig, or over `SSAConfig()` for a plain checkpoint, which they convert; they cannot
    change `gate` or `layers` of a converted checkpoint (its weights depend on them). `ssa_config` instead gives the
    whole SSAConfig. Other keyword arguments go to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, ...).
    """
    path = str(path)
    require_local_path(path, "model")
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, **hub_kwargs)
    saved = getattr(config, CONFIG_KEY, None)
    if ssa_config is not None and ssa_overrides is not None:
        raise ValueError("Pass ssa_config (the whole SSAConfig) or ssa_overrides (some fields), not both.")
    if isinstance(ssa_config, dict):
        ssa_config = SSAConfig.from_dict(ssa_config)
    if ssa_overrides is not None:
        base = SSAConfig.from_dict(saved) if saved is not None else SSAConfig()
        ssa_config = base.replace(**ssa_overrides)
        if saved is not None:
            _check_structure(base, ssa_config, path)
    if ssa_config is None and saved is not None:
        ssa_config = SSAConfig.from_dict(saved)
    if ssa_config is None:
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    if saved is not None:
        delattr(config, CONFIG_KEY)  # convert() writes it back
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with _ignore_ssa_weights_on_load(model_cls):
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    convert(model, ssa_config)
    _load_ssa_weights(model, path, hub_kwargs, ssa_config, saved)
    return model


class AutoSSAModelForCausalLM:
    """Loads SSA models the way `AutoModelForCausalLM` loads plain ones.

    `from_pretrained(path_or_hub_id)` rebuilds a model saved after `ssa_adapt.convert` (its `config.json`
    carries `ssa_config`). Given a plain checkpoint, pass `ssa_config=SSAConfig(...)` (or `ssa_overrides={...}`
    over the defaults) to convert it on load. See `load_causal_lm` for the arguments.
    """

    def __init__(self, *args, **kwargs):
        raise OSError("Use AutoSSAModelForCausalLM.from_pretrained(path_or_hub_id).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        *,
        ssa_config: SSAConfig | dict | None = None,
        ssa_overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> torch.nn.Module:
        path = str(pretrained_model_name_or_path)
        if ssa_config is None and ssa_overrides is None:
            require_local_path(path, "model")
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            kwargs["config"] = kwargs.get("config") or AutoConfig.from_pretrained(path, **hub_kwargs)
            if getattr(kwargs["config"], CONFIG_KEY, None) is None:
                raise ValueError(
                    f"{path!r} is a plain checkpoint (its config has no {CONFIG_KEY!r}); pass "
                    "ssa_config=SSAConfig(...) to convert it while loading."
                )
        return load_causal_lm(path, ssa_config=ssa_config, ssa_overrides=ssa_overrides, **kwargs)
