# The two commands of the README: `make demo` and `make test`. Both run `make setup` first.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-integration bench lint fmt clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m embervm.demo

test: setup
	@bash scripts/test.sh $(PYTEST_ARGS)

test-unit: setup
	@$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-integration: setup
	@$(PY) -m pytest tests/integration -q $(PYTEST_ARGS)

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	@$(VENV)/bin/ruff check src tests bench
	@$(VENV)/bin/ruff format --check src tests bench
	@$(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports

fmt: setup
	@$(VENV)/bin/ruff format src tests bench
	@$(VENV)/bin/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info src/*.egg-info
