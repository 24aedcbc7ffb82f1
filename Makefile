# Two entry points, each installing what it needs into .venv from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch is installed first where no NVIDIA GPU is present, so that
# resolving the other dependencies never pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test test-slow bench clean

$(PY):
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install "$(TORCH_CPU)"; fi

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install -e ".[dev,demo]"
	touch $@

$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PIP) install -e ".[demo]"
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/qfusion demo

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.dev-installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/bench_attention.py

clean:
	rm -rf $(VENV)
