# enginesmith: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ES := $(VENV)/bin/enginesmith
# On the CPU machines here, torch==2.13.0 resolves to a local CPU wheel; override for a GPU box.
TORCH_SPEC ?= torch==2.13.0
OUT ?= out
EXTRAS ?= torch,serve,dev

.PHONY: venv test lint plan-all clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.stamp

test: venv
	$(PY) -m pytest -q -rs --durations=15 tests

lint: venv
	$(VENV)/bin/ruff check builders runtime triton_repo client tests benchmarks

plan-all: venv
	@for r in recipes/*.yaml; do echo "== $$r"; $(ES) plan $$r || exit 1; done

clean:
	rm -rf $(OUT)
