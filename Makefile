# The README's two commands. Both create .venv on first use (torch comes from pip's usual sources).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: run test test-fast test-gpu bench bench-gpu install install-test clean-cache

$(BIN)/python:
	$(PY) -m venv $(VENV)

# stamp files: reinstall only when pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . 2> $(VENV)/pip.log || (cat $(VENV)/pip.log; exit 1)
	$(BIN)/ens --help > /dev/null
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]' 2> $(VENV)/pip.log || (cat $(VENV)/pip.log; exit 1)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(BIN)/ens run digits/final.yaml

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

# the edit-test loop: every test that trains nothing (tests that train carry the `slow` marker; GPU tests `gpu`)
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/run_all.py

# the GPU tier (tests/gpu, marker gpu): skipped with one line ("no CUDA") on a machine without CUDA
test-gpu: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m gpu tests/gpu

# the paddy members on the GPU (row 8), written into BENCHMARKS.md; "skipped: no CUDA" without one
bench-gpu: $(VENV)/.installed
	$(BIN)/python benchmarks/gpu_members.py --write

clean-cache:
	rm -rf cache/digits cache/data/digits cache/fingerprints
