# The two commands (README): `make demo` and `make test`. Each makes its own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean sdks

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The plugin SDKs in other languages: each build script is idempotent (seconds when nothing
# changed), runs its language's own tests, and leaves sdk/<lang>/dist/example-plugin for pytest.
SDK_BUILDS := sdk/go/build.sh sdk/rust/build.sh

sdks:
	set -e; for build in $(SDK_BUILDS); do bash $$build; done

test: $(STAMP) sdks
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q; status=$$?; [ $$status -eq 5 ] && echo "no tests collected" && exit 1; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
