# The README's set-up commands. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test test-slow demo lint benchmark benchmark-gpu clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11); pass PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# pytest exit 5 means no test was collected: a broken suite, reported as a failure.
test: $(VENV)/.installed
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/fulora demo --out demo-run

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

benchmark: $(VENV)/.installed
	$(PY) benchmarks/bench_data.py

# Every GPU figure (issue 16): about 20 minutes on one H100; results in benchmarks/results/.
benchmark-gpu: $(VENV)/.installed
	$(PY) benchmarks/gpu_suite.py --out benchmarks/results/

clean:
	rm -rf $(VENV) demo-run .pytest_cache
