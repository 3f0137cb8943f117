# `make test` and `make demo` work on a fresh machine: each creates .venv and installs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AMUSED := $(VENV)/bin/amused
STAMP := $(VENV)/.installed-stamp
DEMO := demo-out

.PHONY: install lint test test-unit test-all demo bench bench-gpu clean

$(STAMP): pyproject.toml requirements/img2dataset.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: the local CPU wheel here, the CUDA build on a GPU machine.
	$(PY) -m pip install -q torch==2.13.0
	# deepspeed ships only an sdist whose build imports torch; without build isolation
	# it builds against the torch above instead of pulling another one into a build env.
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	$(PY) -m pip install -q --no-deps -r requirements/img2dataset.txt
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two tiers: the unit tier (seconds) fails fast before the integration tier starts.
test: lint test-unit
	$(PY) -m pytest -q -m 'not slow and not unit' --durations=10

test-unit: $(STAMP)
	$(PY) -m pytest -q -m unit

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' --durations=10

demo: $(STAMP)
	# The whole graph from one config (configs/demo.yaml); a rerun finds every stage done.
	$(AMUSED) run configs/demo.yaml
	# The newest complete checkpoint, as every reader finds it (a folder without its marker never counts).
	$(AMUSED) export --checkpoint $$($(PY) -c "from amused.training.checkpoint import Checkpoint; print(Checkpoint.latest('$(DEMO)/run/train').folder)") --output $(DEMO)/pipeline

bench: $(STAMP)
	$(PY) benchmarks/filter.py
	$(PY) benchmarks/download.py
	$(PY) benchmarks/shard_format.py
	$(PY) benchmarks/bytes_per_sample.py
	$(PY) benchmarks/pretokenize.py
	$(PY) benchmarks/pretokenize.py --model-free
	$(PY) benchmarks/train.py
	$(PY) benchmarks/sample.py

# The GPU measurement in one command, <= 8 minutes on one H100/H200 (benchmarks/bench_gpu.py;
# --smoke runs it on the CPU). The stamp installs the CUDA build of the pinned torch there.
BENCH_OUT ?= bench-gpu-out
bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py --out $(BENCH_OUT)

clean:
	rm -rf $(DEMO)
