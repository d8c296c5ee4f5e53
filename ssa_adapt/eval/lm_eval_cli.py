"""lm-eval's command line with the `ssa` model registered: every argument is lm-eval's own.

    ssa-lm-eval run --model ssa \\
        --model_args pretrained=PATH,inference_mode=sparse,block_size=16,block_count=16,sink_blocks=1 \\
        --include_path "$(python -c 'from ssa_adapt.assets import benchmark_tasks; print(benchmark_tasks())')" \\
        --tasks ssa_hellaswag,ssa_piqa --batch_size 8

lm-eval 0.4.x discovers models only through its own registry (no entry-point group), so the plain `lm_eval`
command cannot see `ssa`; this wrapper registers it, then runs `lm_eval.__main__.cli_evaluate()`.
"""

from __future__ import annotations

import sys

HELP = """\
ssa-lm-eval: lm-eval's command line with ssa_adapt's model `ssa` registered (every option below is lm-eval's own).

  ssa-lm-eval run --model ssa --model_args pretrained=PATH[,inference_mode=sparse,block_count=16,...] --tasks ...

`ssa` model_args: pretrained (a converted checkpoint, or a plain Llama / Mistral / Qwen2 / Qwen3 one, converted on
load), inference_mode (sparse | full), block_size, block_count, sink_blocks, local_blocks, backend (override the
checkpoint's SSAConfig), rope_scaling_factor, rope_original_max_position_embeddings; any other is the `hf` model's.
Offline benchmark tasks (ssa_hellaswag, ssa_piqa, ssa_arc_easy, ssa_arc_challenge, ...): --include_path "$(python -c
'from ssa_adapt.assets import benchmark_tasks; print(benchmark_tasks())')". lm-eval's help follows.
"""


def main() -> None:
    if len(sys.argv) == 1 or any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(HELP)
    from . import lm_eval_model  # noqa: F401  (registers "ssa")

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:  # pragma: no cover
        raise SystemExit(f"lm-eval is not installed ({err}); pip install 'lm-eval>=0.4.9'.") from err
    cli_evaluate()


if __name__ == "__main__":
    main()
