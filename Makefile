# Two entry points (see README): `make demo` and `make test`. Both create or reuse the virtual environments and build
# the extension. One environment per megatron-core version CI tests (.venv-mcore-<version>); the same source tree and
# the same compiled library serve both (the extension depends on torch only).
#
#   make test                  the whole suite against every version in MCORE_VERSIONS, one after the other
#   make test MCORE=0.19.2     the whole suite against one version
#   make demo [MCORE=...]      the main job (default: the first version)
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
MCORE_VERSIONS := 0.16.1 0.19.2
MCORE ?=
export MAX_JOBS ?= 2
export GLOO_SOCKET_IFNAME ?= lo

TEST_VERSIONS := $(if $(MCORE),$(MCORE),$(MCORE_VERSIONS))
DEMO_VERSION := $(if $(MCORE),$(MCORE),$(firstword $(MCORE_VERSIONS)))
venv = .venv-mcore-$(1)
# megatron-core 0.17+ declares Python >= 3.12 in its metadata only (its cp311 wheel and its sources run on 3.11), and
# imports triton unconditionally; its other runtime dependencies (torch, numpy, packaging) are already installed.
mcore_install = $(if $(filter 0.16.%,$(1)),megatron-core==$(1),--no-deps --ignore-requires-python megatron-core==$(1) \
	triton==3.9.0 einops==0.8.2)

.PHONY: venv build test demo bench clean

venv: $(foreach v,$(TEST_VERSIONS),$(call venv,$(v))/.deps)

.venv-mcore-%/.deps: requirements-dev.txt
	$(PYTHON) -m venv .venv-mcore-$*
	.venv-mcore-$*/bin/python -m pip install -q --upgrade pip
	.venv-mcore-$*/bin/python -m pip install -q torch==$(TORCH_VERSION)
	.venv-mcore-$*/bin/python -m pip install -q -r requirements-dev.txt
	.venv-mcore-$*/bin/python -m pip install -q $(call mcore_install,$*)
	touch $@

build-%: .venv-mcore-%/.deps
	.venv-mcore-$*/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch .venv-mcore-$*/.built

build: $(addprefix build-,$(TEST_VERSIONS))

# Every environment is built first; MBE_MCORE_PYTHONS lists each built environment's interpreter, for the tests that
# cross versions (a checkpoint written under one version, read under another).
test: build
	@pythons=""; for v in $(MCORE_VERSIONS); do \
	  [ -f .venv-mcore-$$v/.built ] && pythons="$$pythons $(CURDIR)/.venv-mcore-$$v/bin/python"; \
	done; \
	for v in $(TEST_VERSIONS); do \
	  echo "== pytest against megatron-core $$v (.venv-mcore-$$v)"; \
	  MBE_MCORE_PYTHONS="$${pythons# }" .venv-mcore-$$v/bin/python -m pytest -q tests || exit 1; \
	done

demo: build-$(DEMO_VERSION)
	$(call venv,$(DEMO_VERSION))/bin/python -m megatron_bridge_ext demo

bench: build-$(DEMO_VERSION)
	$(call venv,$(DEMO_VERSION))/bin/python benchmarks/bench_ops.py --check

clean:
	rm -rf build *.egg-info megatron_bridge_ext/*.so
