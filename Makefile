# onnx-pipeline: one command to set up and run, one to test.
# The virtual environment is created once; a stamp file makes a second `make` install nothing
# until pyproject.toml changes.

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
RECIPE   ?= configs/digits-cnn.yaml
MODEL    ?= models:/digits-cnn@champion
HOST     ?= 127.0.0.1
PORT     ?= 8000
UI_PORT  ?= 5000
STORE    ?= sqlite:///mlruns/mlflow.db
# Triton's Python client, for tests only: it pins protobuf and ml_dtypes versions that onnx and mlflow
# refuse, so it lives in its own small venv and runs as a separate process. The package tests also
# read Triton's model-configuration schema from it (tritonclient/grpc/model_config_pb2.py).
TRITON_VENV  ?= .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: all install run test test-deps ui serve bench-serve tracking-server clean help

all: $(STAMP)  ## set up, then run every stage with the default recipe
	$(BIN)/pipeline run --recipe $(RECIPE)

install: $(STAMP)  ## create .venv and install the project (idempotent)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "Creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "Installing onnx-pipeline into $(VENV) (the first time takes a few minutes)"
	$(BIN)/python -m pip install -qq -e '.[test]'
	@touch $@

run: all

test: $(STAMP) $(TRITON_STAMP) test-deps  ## run the test suite (temporary MLflow stores; never touches mlruns/)
	$(BIN)/python -m pytest

# The Node example's node_modules, for the package tests (onnxruntime-node from the npm registry).
# Its install script downloads GPU binaries from outside and fails offline; the CPU binaries ship
# inside the package, so that script is skipped. Without npm the Node test skips, saying why.
NODE_EXAMPLE  := examples/node
NODE_STAMP    := $(NODE_EXAMPLE)/node_modules/.installed

test-deps: $(NODE_STAMP)  ## install the Node example's dependencies (when npm is there)

$(NODE_STAMP): $(NODE_EXAMPLE)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		echo "Installing the Node example's dependencies (onnxruntime-node, CPU binaries only)"; \
		cd $(NODE_EXAMPLE) && npm ci --onnxruntime-node-install=skip --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the Node example's test will be skipped"; fi

$(TRITON_STAMP):
	@test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -qq 'tritonclient[http]>=2.40' numpy
	@touch $@

ui: $(STAMP)  ## browse runs and the model registry
	@echo "MLflow UI: http://$(HOST):$(UI_PORT)  (store: $(STORE))"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow ui --backend-store-uri $(STORE) --host $(HOST) --port $(UI_PORT)

serve: $(STAMP)  ## serve the champion over the KServe v2 protocol
	$(BIN)/pipeline serve --model $(MODEL) --host $(HOST) --port $(PORT)

bench-serve: $(STAMP)  ## load benchmark: our server vs mlflow models serve (about 2 minutes)
	$(BIN)/python benchmarks/serve_load.py

tracking-server: $(STAMP)  ## team MLflow server on PostgreSQL (.tracking/), http://127.0.0.1:5000
	$(BIN)/python -m pipeline.tracking_server --root .tracking --host $(HOST) --port $(UI_PORT)

clean:  ## remove run directories (keeps mlruns/ and .venv)
	rm -rf runs

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/:/'
