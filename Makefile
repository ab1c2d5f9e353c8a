# Convenience over the `xvq` command (which runs on Linux, macOS and Windows without make).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
XVQ     := $(BIN)/xvq
MODEL   ?= xvq/demo/model
NAME    ?= $(if $(filter xvq/demo/model,$(MODEL)),XVERSE-Demo,)
OUT     ?= out
TYPES   ?= Q4_K_M Q8_0
BITS    ?= 4
PYTEST_ARGS ?=
NAMEOPT := $(if $(NAME),--name $(NAME),)
# llama.cpp's backend: CPU, Metal on macOS (llama.cpp's own default there), CUDA with GPU=cuda.
GPU     ?= $(if $(wildcard $(VENV)/.xvq-setup-cuda),cuda,)   # a CUDA set-up stays CUDA until GPU=cpu
UNAME_S := $(shell uname -s)
BACKEND := $(if $(filter cuda,$(GPU)),cuda,$(if $(filter Darwin,$(UNAME_S)),metal,cpu))
CMAKE_cpu   := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
CMAKE_metal := -DGGML_METAL=on -DLLAVA_BUILD=OFF
CMAKE_cuda  := -DGGML_CUDA=on -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
export CMAKE_ARGS ?= $(CMAKE_$(BACKEND))
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
LLAMA_CPP_PIN := $(shell grep -m1 '^llama-cpp-python==' requirements.lock)
STAMP   := $(VENV)/.xvq-setup$(if $(filter cpu,$(BACKEND)),,-$(BACKEND))

.PHONY: setup test demo gguf gptq validate release anchors bench bench-gpu clean

setup: $(STAMP)

# torch first: `pip install torch==2.13.0` takes the CPU wheel; any other spec pulls CUDA wheels.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@# a venv set up for another backend keeps its llama-cpp-python build: rebuild it for this one
	if ls $(VENV)/.xvq-setup* 2>/dev/null | grep -qvx "$(STAMP)"; then \
	  $(BIN)/python -m pip install -q --force-reinstall --no-deps --no-cache-dir "$(LLAMA_CPP_PIN)"; fi
	rm -f $(VENV)/.xvq-setup*
	touch $(STAMP)

# llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity) and converter, built
# from the llama-cpp-python sdist: the references that tests and bench/ compare against.
anchors: setup
	$(BIN)/python -m xvq.anchors build

test: setup anchors
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(XVQ) release $(MODEL) $(NAMEOPT) --out-root $(OUT)

gguf: setup
	$(XVQ) convert $(MODEL) $(NAMEOPT) --out-root $(OUT) --outtype f16
	$(XVQ) quantize gguf $(MODEL) $(NAMEOPT) --out-root $(OUT) $(foreach t,$(TYPES),--type $(t))

gptq: setup
	$(XVQ) quantize gptq $(MODEL) $(NAMEOPT) --out-root $(OUT) --bits $(BITS)

validate: setup
	$(XVQ) validate --reference $(MODEL) $(NAMEOPT) --out-root $(OUT) --layout

release: setup
	$(XVQ) release $(MODEL) $(NAMEOPT) --out-root $(OUT)

# Speed and memory against llama.cpp's own tools, each a printed table with ratios (slow).
bench: setup anchors
	for b in convert quantize validate gptq gptq_moe gptq_memory delta tokenizer_parity identity; do $(BIN)/python bench/$$b.py || exit 1; done
	$(BIN)/python bench/scale.py --quick

# xvq against llama-imatrix / llama-perplexity -ngl 99 on this machine's CUDA GPU (builds llama.cpp for it).
bench-gpu: setup
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(OUT) .pytest_cache
