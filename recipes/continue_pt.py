"""Continued pretraining of a pretrained causal LM with SSA attention (SPEC section 2) through `SSATrainer`.

SmolLM2-135M on the Debian documentation corpus at 8k context, one GPU (both assets fetched offline on first use;
`python recipes/data/fetch_assets.py` fetches them ahead):

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/continue_pt.py \\
        --config recipes/configs/smollm2-135m.yaml

The same on the CPU, sized to finish in a few minutes (512-token context, 20 steps):

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

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ssa_adapt.trainer import SSATrainer, SSATrainingConfig, load_text_dataset, resolve_model_name


def main(script_args: ScriptArguments, training_args: SSATrainingConfig, model_args: ModelConfig) -> None:
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
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)  # "last": the newest complete one
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved to {training_args.output_dir}")
    if hasattr(trainer, "end"):  # transformers >= 5.18: close the trackers and the process group
        trainer.end()


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SSATrainingConfig, ModelConfig))
    main(*parser.parse_args_and_config())
