# Quickstart: `make run` (pipeline on the embedded default), `make test` (test suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# `make ui UI_PORT=5001` for another port; UI_STORE for another store.
UI_PORT ?= 5000
UI_STORE ?= sqlite:///mlflow.db

export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
# The PATH make was started with: the GPU check runs the machine's own Python and packages, not the venv's.
MACHINE_PATH := $(PATH)
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-compat compare ui gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: install
	dvc repro

test: install
	python -m pytest

# The tests that build backbones, checkpoint activations and train, again with the GPU machines' transformers
# (pure Python, laid over the venv): the oldest version pyproject.toml declares.
COMPAT := .compat/transformers-5.17
COMPAT_TESTS := tests/test_model.py tests/test_training.py tests/test_host_sync.py tests/test_text_encoder.py \
	tests/test_official.py tests/test_experiments.py tests/test_pretrained.py

$(COMPAT)/.installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --no-deps --target $(COMPAT) transformers==5.17.0 huggingface-hub==1.33.0
	touch $@

test-compat: $(COMPAT)/.installed
	PYTHONPATH=$(abspath $(COMPAT)) python -c "import transformers; assert transformers.__version__ == '5.17.0', transformers.__version__"
	PYTHONPATH=$(abspath $(COMPAT)) python -m pytest $(COMPAT_TESTS)

compare: install
	avse compare

ui: install
	avse ui --store $(UI_STORE) --port $(UI_PORT)   # prints the address of the runs table

# On a GPU machine, with the packages it has (not the pinned CPU torch): see benchmarks/gpu_check.py.
gpu-check:
	@env PATH="$(MACHINE_PATH)" PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf data/synthetic data/synthetic-images data/prepared models embeddings outputs
