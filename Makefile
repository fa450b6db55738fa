# The two commands of the README: `make serve` (the main job) and `make test` (all tests).
# Both create the virtual environment on a fresh machine by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := True

.PHONY: install test serve demo-model bench bench-quick bench-uncertainty attention-comparison bench-scale bench-faults bench-memory lock clean
HOST ?= 127.0.0.1
PORT ?= 3000

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "snodevit needs Python 3.11, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

# The main job: make sure the demo model exists in the BentoML store (on first run: take the checkpoint shipped in
# models/snodevit-mnist, or train one from scratch with RETRAIN=1; then calibrate + export + register), then serve
# it on localhost:3000.
DEMO_CHECKPOINT ?= models/snodevit-mnist
demo-model: $(STAMP)
	$(PY) -m service.demo $(if $(RETRAIN),,$(if $(wildcard $(DEMO_CHECKPOINT)/meta.json),--pretrained $(DEMO_CHECKPOINT)))

serve: demo-model
	$(VENV)/bin/bentoml serve service.service:SNodeViTService --host $(HOST) --port $(PORT)

# Benchmarks (not part of `make test`; their --quick variants run inside the tests).
# Serving path against the machine's own ceilings -> benchmarks/results.md (+ .json).
bench: $(STAMP)
	$(PY) benchmarks/bench.py --out benchmarks

bench-quick: $(STAMP)
	$(PY) benchmarks/bench.py --quick --out runs/bench-quick

# SNodeViT against deterministic+TS, MC dropout and a deep ensemble -> docs/uncertainty-benchmark.md.
# DEVICE=cuda trains on a GPU; CPU timings are always taken on the CPU.
DEVICE ?= auto
bench-uncertainty: $(STAMP)
	$(PY) benchmarks/uncertainty.py --device $(DEVICE) --out docs

# Scaling out (issue 21): Ray scoring rows vs local, torchrun 2 processes vs 1, 2 serving workers vs 1 at
# concurrency 32 -> docs/scaling.json + docs/scaling-ddp.png (quoted by docs/scaling.md). Serves the demo model.
bench-scale: demo-model
	$(PY) benchmarks/scale_out.py --out docs

# Each fault against the real server and `snodevit score` (SIGTERM and kill -9 under load, a 10-minute soak at
# concurrency 64, broken models, a full and a read-only disk) -> docs/reliability.md. Run it under the heavy lock.
bench-faults: $(STAMP)
	$(PY) benchmarks/faults.py --out docs

# The six attention backends side by side -> docs/attention-comparison.md.
attention-comparison: $(STAMP)
	$(PY) benchmarks/attention_comparison.py --device $(DEVICE) --out docs

# Training memory and time per step of --backprop standard / checkpoint / reversible at depth 6, 12, 24 and
# 28 / 224 px, and mnist5k accuracy after 40 epochs, seeds 0-2 -> docs/memory-results.md (+ .json, memory.png).
# About 2 hours on 2 CPU cores (six trainings); run it under the heavy lock. DEVICE=cuda measures with
# torch.cuda.max_memory_allocated and trains seeds 3-5 six at a time -> docs/memory-cuda/ (as benchmarks/gpu_checks.sh).
bench-memory: $(STAMP)
	PYTHONPATH=. $(PY) benchmarks/memory.py --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE)) \
	    $(if $(filter cuda,$(DEVICE)),--out docs/memory-cuda --seeds 3 4 5 --jobs 6,--out docs)

lock:
	{ sed -n '/^#/p' requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -v '^snodevit'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) .bentoml runs
