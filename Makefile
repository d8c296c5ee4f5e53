# The two set-up commands of the README. Each installs what it needs on a fresh CPU machine (Python 3.11).
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install demo test lint

install:
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[dev]"

# Continued pretraining of SmolLM2-135M with the SSA objective on a small real corpus (CPU-sized demo).
demo: install
	$(PYTHON) -m accelerate.commands.launch --num_processes 1 recipes/continue_pt.py --config recipes/configs/smollm2-135m-demo.yaml

test: install
	$(PYTHON) -m pytest -q tests

lint:
	ruff check . && ruff format --check .
