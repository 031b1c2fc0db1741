# Two entry points (see README): `make demo` and `make test`. Both create or reuse .venv and build the extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export MAX_JOBS ?= 2
export GLOO_SOCKET_IFNAME ?= lo

.PHONY: venv build test demo bench clean

venv: $(VENV)/.deps

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

build: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m megatron_bridge_ext demo

bench: build
	$(PY) benchmarks/bench_ops.py --check

clean:
	rm -rf build *.egg-info megatron_bridge_ext/*.so
