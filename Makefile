# The README's two commands: `make run` (the main job on Fashion-MNIST) and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdir/fashion_mnist_repa
CONFIG ?= configs/fashion_mnist.py:reg=repa
# `make run` fits in RUN_BUDGET_S seconds from the start of make, install included: training gets what is left when it
# starts and sizes itself to it (config.train.time_budget_s), keeping time for sampling and evaluation.
RUN_BUDGET_S ?= 870
JOB_START := $(shell date +%s)

.PHONY: venv fashion-mnist run test tensorboard clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e .
	touch $@

# The tests also need PyTorch and the reference implementations the DINOv2 / SD-VAE / Inception ports are checked against.
$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e ".[test,parity]"
	touch $@

venv: $(VENV)/.installed

fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)" \
	         "or put its four IDX .gz files in a directory and pass --config.data.directory=DIR" >&2; exit 1; \
	  fi; }

# Data and encoder -> feature dataset -> train SiT + REPA -> EMA samples (.npz + PNG grid) -> metrics JSON.
# Every stage resumes: a re-run keeps finished shards, checkpoints and sample chunks.
run: venv fashion-mnist
	$(VENV)/bin/python -m repa_jax.main --mode=precompute --config=$(CONFIG) --workdir=$(WORKDIR)
	left=$$(( $(RUN_BUDGET_S) - $$(date +%s) + $(JOB_START) )); \
	$(VENV)/bin/python -m repa_jax.main --mode=train --config=$(CONFIG) --workdir=$(WORKDIR) \
	  --config.train.time_budget_s=$$(( left > 1 ? left : 1 ))
	$(VENV)/bin/python -m repa_jax.main --mode=sample --config=$(CONFIG) --workdir=$(WORKDIR)
	$(VENV)/bin/python -m repa_jax.main --mode=evaluate --config=$(CONFIG) --workdir=$(WORKDIR)

# The training curves, losses and in-training sample grids of the main job (any workdir: make tensorboard WORKDIR=...).
tensorboard: venv
	$(VENV)/bin/tensorboard --logdir $(WORKDIR)

test: $(VENV)/.installed-test fashion-mnist
	$(VENV)/bin/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) workdir
