# The two set-up commands of the README. Each installs what it needs on a fresh CPU machine (Python 3.11).
PYTHON ?= python3
TORCH ?= torch==2.13.0
# one process (the demo config sets use_cpu), every value given so that accelerate has nothing to guess (and nothing to warn about)
LAUNCH = $(PYTHON) -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
	--dynamo_backend no

.PHONY: install demo test lint

install:
	@echo "== make install: torch, then ssa_adapt with its [dev] extras (pip lists what it installs)"
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev]"

# Continued pretraining of SmolLM2-135M with the SSA objective on a small real corpus (CPU-sized demo).
demo: install
	@echo "== make demo: fetches SmolLM2 and the Python docs on first use, then 20 training steps, saved to runs/smollm2-135m-demo"
	$(LAUNCH) recipes/continue_pt.py --config recipes/configs/smollm2-135m-demo.yaml

# Per file: its tests' progress and time; at the end, the slowest tests.
test: install
	$(PYTHON) -m pytest tests -o console_output_style=times --durations=15

lint:
	ruff check . && ruff format --check .
