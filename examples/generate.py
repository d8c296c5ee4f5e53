"""Load a converted model (e.g. the output of `make demo`) and generate from one prompt in sparse and full mode.

    python examples/generate.py runs/smollm2-135m-demo
    python examples/generate.py runs/smollm2-135m-demo --prompt "def fibonacci(n):" --max_new_tokens 40

Greedy decoding with a KV cache (an `SSACache` in sparse mode). A prompt shorter than the receptive field
(block_size x block_count tokens) gives the same text in both modes: every block is selected.
"""

import argparse

from transformers import AutoTokenizer

import ssa_adapt
from ssa_adapt import AutoSSAModelForCausalLM

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", help="folder (or Hub id) of a model saved after ssa_adapt.convert")
parser.add_argument("--prompt", default="The Python standard library", help="text to continue")
parser.add_argument("--max_new_tokens", type=int, default=30)
args = parser.parse_args()

model = AutoSSAModelForCausalLM.from_pretrained(args.model).eval()
tokenizer = AutoTokenizer.from_pretrained(args.model)
config = ssa_adapt.get_controller(model).config
print(f"{args.model}: {config.block_size}x{config.block_count} blocks, {config.sink_blocks} sink, {config.train_mode}")
inputs = tokenizer(args.prompt, return_tensors="pt")
for mode in ("sparse", "full"):
    ssa_adapt.set_inference(model, mode)
    ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"{mode:>6}: {tokenizer.decode(ids[0], skip_special_tokens=True)!r}")
