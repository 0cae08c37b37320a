# `make test` and `make demo` work on a fresh machine: they create .venv when missing and
# re-install only when setup.py or a requirements file changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo demo-rewards tensorboard lint format bench aot clean

$(STAMP): setup.py requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# The TPU venv (requirements-tpu.txt: jax[tpu] with libtpu, the set a Cloud TPU VM installs).
# On a machine without TPUs it compiles for TPU topologies (`make aot`, tests/test_aot.py).
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed

$(TPU_STAMP): setup.py requirements-tpu.txt
	test -x $(TPU_VENV)/bin/python || $(PY) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/pip install --quiet --upgrade pip
	$(TPU_VENV)/bin/pip install --quiet --no-compile -r requirements-tpu.txt
	$(TPU_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(TPU_STAMP)

# Compiles CONFIG's rollout and train step for TOPOLOGY without TPUs and prints per-device
# memory, FLOPs and a roofline step time (visionr1_jax/tools/aot.py; exit 1: does not fit).
#   make aot CONFIG=configs/tpu_v4_64.py TOPOLOGY=v4:4x4x2 AOT_ARGS=--json=v4_64.json
CONFIG ?= configs/tpu_v4_64.py
TOPOLOGY ?= v4:4x4x2
AOT_ARGS ?=

aot: $(TPU_STAMP)
	$(TPU_VENV)/bin/python -m visionr1_jax.tools.aot --config=$(CONFIG) --topology=$(TOPOLOGY) $(AOT_ARGS)

# Three pytest workers (pytest-xdist) on 2 cores, each taking whole files (module fixtures
# stay shared), the longest files first (tests/conftest.py): the suite is mostly
# single-threaded XLA compilation plus subprocess runs that wait on each other, and a third
# worker fills those waits (measured: 17:40 of pytest with 3 workers on a fresh clone).
TEST_WORKERS ?= 3
PYTEST_ARGS ?=

test: $(STAMP) $(TPU_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		$(PYTEST_ARGS) tests

# The paper's experiment in miniature on the laptop config: a small checkpoint and
# synthetic_shapes made locally; SFT, then Vision-R1 vs more SFT, evaluated (README). Started
# again after a kill it resumes (finished stages are skipped); `rm -rf runs/demo` starts afresh.
# Another seed: make demo DEMO_WORKDIR=runs/demo_s1 DEMO_ARGS=--config.seed=1
DEMO_WORKDIR ?= runs/demo
DEMO_ARGS ?=

demo: $(STAMP)
	$(BIN)/python -m visionr1_jax.main --config=configs/demo_cpu.py --workdir=$(DEMO_WORKDIR) $(DEMO_ARGS)

# TensorBoard on a run's (or the demo's) event files, served on this machine only:
#   make tensorboard                      # runs/demo (every stage), http://localhost:6006
#   make tensorboard WORKDIR=gs://BUCKET/run TB_PORT=6007
# A gs:// folder is read through gcsfs, as the run wrote it (--load_fast=false: TensorBoard's
# fast loader has its own GCS client); the credentials are gcloud's application default ones.
WORKDIR ?= $(DEMO_WORKDIR)
TB_PORT ?= 6006
TB_ARGS ?=

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir $(WORKDIR) --host localhost --port $(TB_PORT) \
		$(if $(findstring ://,$(WORKDIR)),--load_fast=false) $(TB_ARGS)

demo-rewards: $(STAMP)
	$(BIN)/python -m visionr1_jax.rewards.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `make bench` runs every benchmark in benchmarks/ with its default arguments (tens of minutes on
# 2 cores; each prints a Markdown table, see BENCHMARKS.md) and fails if any of them failed,
# after running the rest. The PyTorch references they compare against (torch, transformers,
# trl, accelerate, datasets) are in requirements.txt: `make test` runs every benchmark's
# `--smoke` mode (tests/test_bench_*.py). `make bench BENCH_ARGS=--smoke` runs those here.
BENCH_ARGS ?=

bench: $(STAMP)
	@failed=""; for f in benchmarks/*.py; do \
		echo "== $$f $(BENCH_ARGS)"; $(BIN)/python $$f $(BENCH_ARGS) || failed="$$failed $$f"; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed"; exit 1; fi

clean:
	rm -rf $(VENV) $(TPU_VENV) .pytest_cache
