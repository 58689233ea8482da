# The two commands of the README. Both set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test bench bench-smoke clean

## run: install, start `mlynar serve` with embedded defaults and run Mlynar's README example
run: $(VENV)/.installed
	$(BIN)/mlynar serve --registry examples --run-example

## test: install and run the whole test suite
test: $(VENV)/.installed
	$(BIN)/pytest -q

## bench: the full benchmark suite (writes bench/results.json)
bench: $(VENV)/.installed
	$(BIN)/python -m bench

bench-smoke: $(VENV)/.installed
	$(BIN)/python -m bench --smoke

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .mlynar .pytest_cache
