# The two README commands: `make repro` (set up + run the pipeline) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
PYTEST_ARGS ?=
# Two pytest workers at one torch thread each: one builds the end-to-end clone (6.5-8.5 min) while the other runs
# every other module, then both run end-to-end tests (README, Development): 8.5-11 min on a clean clone. Lint
# first (seconds); the slowest tests are listed at the end, for the suite's time budget.
TEST_WORKERS ?= 2
# bitsandbytes (8-bit AdamW) only where a CUDA GPU is present: EXTRAS=test,cuda forces it.
EXTRAS ?= test$(shell nvidia-smi -L >/dev/null 2>&1 && echo ,cuda)

.PHONY: setup repro test lint format params ui exps

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) torch
	# PYTHONWARNINGS: no setuptools banner about editable installs (an InformationOnly warning, nothing to do)
	PYTHONWARNINGS=ignore::UserWarning $(PIP) -e '.[$(EXTRAS)]'
	# open_clip only carries the CLIP BPE vocabulary file; its torchvision dependency is not needed.
	$(PIP) --no-deps open_clip_torch
	touch $@

setup: $(VENV)/.installed

repro: setup
	dvc repro

test: lint
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

lint: setup
	ruff check . && ruff format --check .

format: setup
	ruff format . && ruff check --fix .

# Recompose params.yaml from conf/ (what `dvc exp run` does before each experiment).
params: setup
	python -m stages.compose

# MLflow's server with the project's app (stages/lib/tracking/mlflow_ui.py: the model-training view and the
# headline metric columns by default), without MLflow 3's job runner (GenAI scorers; 8 more processes).
ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --app-name sd-personalise --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# `dvc exp show` narrowed to the params that vary and the headline metrics (readable in 200 columns).
exps: setup
	python -m stages.lib.tracking.exp_show
