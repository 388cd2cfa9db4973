# Two-command quick start: `make demo` and `make test`. Both build (or reuse) a virtualenv with a
# Python >= 3.12, which megatron-core 0.19.2 requires.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU tests run in this many processes (pytest-xdist), a test module per process at a time: its module-scoped
# fixtures (a megatron world, a saved checkpoint) are built once. `make test TEST_WORKERS=1` runs them in one.
TEST_WORKERS ?= 2

# Find a Python >= 3.12 by itself: PATH first, then pyenv's installed versions (oldest first:
# megatron-core's wheel is built for 3.12).
define find_python
for c in python3.12 python3.13 python3; do \
  p=$$(command -v $$c 2>/dev/null) || continue; \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
done; \
root=$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv); \
for p in $$(ls -d $$root/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
done; exit 1
endef

.PHONY: venv demo test test-gpu test-fast clean-venv

$(STAMP): pyproject.toml
	@base=$$( $(find_python) ) || { echo "error: no Python >= 3.12 found on PATH or under pyenv; install one (megatron-core 0.19.2 needs it)" >&2; exit 1; }; \
	echo "using Python $$($$base -c 'import sys; print(sys.version.split()[0])') at $$base"; \
	[ -x $(PY) ] || $$base -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -e '.[dev]' && touch $(STAMP)

venv: $(STAMP)
	@echo "virtualenv: $(VENV) ($$($(PY) --version))"

demo: $(STAMP)
	$(PY) -m megatron_ext.demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not slow" tests

# The GPU tests need torch and megatron-core like the rest: the same virtualenv as `make test`; one process (they
# share the GPU).
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

clean-venv:
	rm -rf $(VENV)
