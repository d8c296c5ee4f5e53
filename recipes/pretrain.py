"""From-scratch pretraining of the paper's SSA-1B and its baselines with `SSATrainer`.

First pack a corpus (offline: the Debian documentation corpus, SmolLM2's tokenizer):

    python recipes/cache_data.py --dataset_name asset:debian-docs --tokenizer asset:smollm2-135m \\
        --out ~/.cache/ssa_adapt/packed/debian-docs-smollm2

Then train one of the four models of the paper, on one GPU or many:

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/pretrain.py \\
        --config recipes/configs/ssa-1b.yaml --train_mode ssa      # or full (FullAttn), sparse (MoBA), nsa (NSA)

A tiny model on the CPU (what CI trains): `--config recipes/configs/pretrain-debug.yaml`. Long-context
continuation of a trained model (32k, RoPE llama3 scaling x4 from 8192, lr 1e-5):
`--config recipes/configs/ssa-1b-32k.yaml --init_from runs/ssa-1b/checkpoint-N`. Liger kernels: `--use_liger_kernel`
(when liger-kernel is installed). `--resume_from_checkpoint last` resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import TrlParser

from ssa_adapt import AutoSSAModelForCausalLM
from ssa_adapt.packed_data import PackedTokenDataset
from ssa_adapt.trainer import SSATrainer, SSATrainingConfig, resolve_model_name


@dataclass
class PretrainArguments:
    token_cache: str = field(metadata={"help": "Folder written by recipes/cache_data.py."})
    seq_len: int = field(default=8192, metadata={"help": "Tokens per training sequence."})
    tokenizer: str = field(
        default="asset:smollm2-135m",
        metadata={"help": "The corpus's tokenizer, saved with the model (a folder or Hub id)."},
    )
    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 8192
    rope_theta: float = 500000.0
    rope_scaling: str | None = field(
        default=None, metadata={"help": 'JSON, e.g. {"rope_type": "llama3", "factor": 4.0, ...} for long context.'}
    )
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    init_from: str | None = field(default=None, metadata={"help": "A trained SSA checkpoint to continue from."})


def stack_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fixed-length packed sequences -> {input_ids, position_ids, labels} [B, seq_len]."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def build_model(args: PretrainArguments, vocab_size: int) -> LlamaForCausalLM:
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling:
        rope.update(json.loads(args.rope_scaling))
    if args.init_from:  # continue a trained model, with the RoPE and length of this run
        config = AutoConfig.from_pretrained(args.init_from)
        config.rope_parameters = rope
        config.max_position_embeddings = args.max_position_embeddings
        return AutoSSAModelForCausalLM.from_pretrained(args.init_from, config=config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        rope_parameters=rope,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    return LlamaForCausalLM(config)


def main(script_args: PretrainArguments, training_args: SSATrainingConfig, callbacks=None) -> SSATrainer:
    """Build the model and data of `script_args`, train with `SSATrainer` (extra `callbacks` go to the trainer)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(script_args.tokenizer))
    model = build_model(script_args, len(tokenizer))
    train_dataset = PackedTokenDataset(script_args.token_cache, script_args.seq_len).as_hf_dataset()
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    training_args.remove_unused_columns = False
    trainer = SSATrainer(
        model,
        training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=stack_batch,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)  # "last": the newest complete one
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    parser = TrlParser((PretrainArguments, SSATrainingConfig))
    main(*parser.parse_args_and_config())
