# Two entry points: `make run` (demo with real blue/green upstreams) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint fuzz bench clean

# Any source change reinstalls: the editable install compiles the data plane with mypyc in place,
# and a compiled module would otherwise shadow the edited .py (BGPROXY_PURE=1 skips compiling).
SOURCES := $(shell find bgproxy -name '*.py')

$(STAMP): pyproject.toml setup.py $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	bash .ci/build-deps $(BIN)/python
	find bgproxy -name '*.so' -delete; rm -f *__mypyc*.so
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/bgproxy demo --config config/bgproxy.yaml

lint: $(STAMP)
	$(BIN)/ruff check bgproxy tests bench setup.py
	$(BIN)/ruff format --check bgproxy tests bench setup.py
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP) lint
	bash .ci/system-deps
	$(BIN)/python -m pytest

# The differential fuzzer with 20,000 examples per property instead of make test's 150 (~2.5 min).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

bench: $(STAMP)
	bash .ci/system-deps
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache *__mypyc*.so
	find bgproxy -name '*.so' -delete
