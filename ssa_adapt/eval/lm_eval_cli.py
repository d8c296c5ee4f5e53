"""lm-eval's command line with the `ssa` model registered: every argument is lm-eval's own.

    python -m ssa_adapt.eval.lm_eval_cli --model ssa \\
        --model_args pretrained=PATH,inference_mode=sparse,block_size=16,block_count=16,sink_blocks=1 \\
        --include_path "$(python -c 'from ssa_adapt.assets import benchmark_tasks; print(benchmark_tasks())')" \\
        --tasks ssa_hellaswag,ssa_piqa --batch_size 8

lm-eval 0.4.x discovers models only through its own registry (no entry-point group), so the plain `lm_eval`
command cannot see `ssa`; this wrapper registers it, then runs `lm_eval.__main__.cli_evaluate()`.
"""

from __future__ import annotations


def main() -> None:
    from . import lm_eval_model  # noqa: F401  (registers "ssa")

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:  # pragma: no cover
        raise SystemExit(f"lm-eval is not installed ({err}); pip install 'lm-eval>=0.4.9'.") from err
    cli_evaluate()


if __name__ == "__main__":
    main()
