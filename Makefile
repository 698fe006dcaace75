# onnx-pipeline: one command to set up and run, one to test.
# The virtual environment is created once; a stamp file makes a second `make` install nothing
# until pyproject.toml or constraints.txt changes.

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
# Every install takes exact versions from a constraints file (written by `make lock`), so a fresh clone
# gets the packages the tests last passed with, not the newest of the day (Typer's help output once
# changed under us that way). pyproject.toml says what the project needs; these files say which build.
CONSTRAINTS := constraints.txt
# The project's extras (pyproject.toml): `serve` (a slim server, no torch), `full` (the whole pipeline,
# serve included). `make install` installs full.
# The team tracking server's extra (psycopg2, MLflow's PostgreSQL driver): `make tracking-server` and
# `make test` (which runs one) install it; `make install` does not need it.
TEAM_STAMP  := $(VENV)/.installed-team
RECIPE   ?= configs/digits-cnn.yaml
MODEL    ?= models:/digits-cnn@champion
HOST     ?= 127.0.0.1
PORT     ?= 8000
GRPC_PORT ?= 8001
UI_PORT  ?= 5000
STORE    ?= sqlite:///mlruns/mlflow.db
# Triton's Python client, for tests only: it pins protobuf and ml_dtypes versions that onnx and mlflow
# refuse, so it lives in its own small venv and runs as a separate process. The package tests also
# check the vendored copy of Triton's model-configuration schema against it (tritonclient/grpc/model_config_pb2.py).
# Its version is pinned in constraints-triton.txt: 2.46.0, whose wheel also carries the perf_analyzer
# binary (later wheels moved it to a package of its own). The gRPC tests use its gRPC client; perf_analyzer
# needs libcudart.so.12 (pip's nvidia-cuda-runtime-cu12, installed here) and Debian's libb64-0d (.ci/run
# installs it; benchmarks/perf_analyzer.sh says how). Without them those tests skip, saying why.
TRITON_VENV        ?= .venv-triton
TRITON_CONSTRAINTS := constraints-triton.txt
TRITON_STAMP       := $(TRITON_VENV)/.installed

.PHONY: all install run test test-deps ui serve bench-serve tracking-server lock clean help

all: $(STAMP)  ## set up, then run every stage with the default recipe
	$(BIN)/pipeline run --recipe $(RECIPE)

install: $(STAMP)  ## create .venv and install the project (idempotent)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || { echo "Creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "Installing onnx-pipeline into $(VENV) (the first time takes a few minutes)"
	$(BIN)/python -m pip install -qq -c $(CONSTRAINTS) -e '.[full,test]'
	@touch $@

$(TEAM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -qq -c $(CONSTRAINTS) -e '.[full,test,team]'
	@touch $@

run: all

test: $(STAMP) $(TEAM_STAMP) $(TRITON_STAMP) test-deps  ## run the test suite (temporary MLflow stores; never touches mlruns/)
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

$(TRITON_STAMP): $(TRITON_CONSTRAINTS)
	@test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -qq -c $(TRITON_CONSTRAINTS) 'tritonclient[http,grpc]' numpy nvidia-cuda-runtime-cu12
	@touch $@

ui: $(STAMP)  ## browse runs and the model registry
	@echo "MLflow UI: http://$(HOST):$(UI_PORT)  (store: $(STORE))"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow ui --backend-store-uri $(STORE) --host $(HOST) --port $(UI_PORT)

serve: $(STAMP)  ## serve the champion over the KServe v2 protocol (HTTP $(PORT), gRPC $(GRPC_PORT))
	$(BIN)/pipeline serve --model $(MODEL) --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT)

# The serving benchmark drives the servers with wrk and h2load (Debian: apt-get install wrk nghttp2-client)
# and compares with a real Triton when TRITON_SERVER_VENV names a venv holding nvidia-pytriton and
# onnxruntime (see benchmarks/serve_load.py); without them it says what it skipped.
bench-serve: $(STAMP)  ## load benchmark: our server (1 and N workers) vs Triton and mlflow models serve (~8 minutes)
	$(BIN)/python benchmarks/serve_load.py

tracking-server: $(TEAM_STAMP)  ## team MLflow server on PostgreSQL (.tracking/), http://127.0.0.1:5000
	$(BIN)/python -m pipeline.tracking_server --root .tracking --host $(HOST) --port $(UI_PORT)

# Regenerate the constraints files from what the venvs hold now. To upgrade a package:
#   .venv/bin/python -m pip install -U NAME   (or edit pyproject.toml and delete NAME's line in constraints.txt)
#   make test && make lock                    then commit constraints*.txt with the change
# Local version labels are dropped (torch 2.13.0+cpu is pinned as 2.13.0: pip still prefers the CPU wheel
# where one is on disk, being the higher version, and the pin stays installable from PyPI elsewhere).
# --all keeps setuptools (torch requires >= 77; a new venv has an older one); pip is the venv's own.
LOCK_FILTER := grep -viE '^(onnx[-_]pipeline|pip)([ =@]|$$)' | sed -E 's/\+[A-Za-z0-9.]+$$//'
lock: $(TEAM_STAMP) $(TRITON_STAMP)  ## pin every package of .venv and .venv-triton into constraints*.txt
	@{ echo '# Exact versions of every package in .venv (`make install`, plus the test and team extras).'; \
	   echo '# Written by `make lock` from pip freeze; see the Makefile for how to upgrade.'; \
	   $(BIN)/python -m pip freeze --all --exclude-editable | $(LOCK_FILTER); } > $(CONSTRAINTS).tmp
	@{ echo '# Exact versions of every package in .venv-triton (Triton'"'"'s client, for tests only).'; \
	   echo '# Written by `make lock` from pip freeze; see the Makefile for how to upgrade.'; \
	   $(TRITON_VENV)/bin/python -m pip freeze --all | $(LOCK_FILTER); } > $(TRITON_CONSTRAINTS).tmp
	@mv $(CONSTRAINTS).tmp $(CONSTRAINTS) && mv $(TRITON_CONSTRAINTS).tmp $(TRITON_CONSTRAINTS)
	@touch $(STAMP) $(TEAM_STAMP) $(TRITON_STAMP)  # the venvs hold exactly what the files now say
	@echo "wrote $(CONSTRAINTS) ($$(grep -vc '^#' $(CONSTRAINTS)) packages) and $(TRITON_CONSTRAINTS) ($$(grep -vc '^#' $(TRITON_CONSTRAINTS)))"

clean:  ## remove run directories (keeps mlruns/ and .venv)
	rm -rf runs

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/:/'
