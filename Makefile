# The two commands (README): `make demo` and `make test`. Each makes its own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-lambda test test-prereqs checks lint bench clean proto sdks native-sdks venv-sdks \
	docker-engine docker-prereqs services-prereqs lambda-runtime rewritten-tests

$(STAMP): pyproject.toml sdk/python/pyproject.toml
	@echo "installing the dispatcher and the plugin SDK (editable, extras http grpc knative dev; dev brings reqwest for the tests and benchmarks) into $(VENV): about a minute the first time"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# setuptools warns on every editable build that a folder named like the package may
	@# shadow it; here that folder is the package itself, so the warning says nothing.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -e './sdk/python[http,grpc,knative]' -e '.[dev]'
	@# A virtualenv made before the SDK was its own distribution loses dispatcher-plugin when
	@# pip removes the old host package after installing the SDK; put it back.
	[ -x $(BIN)/dispatcher-plugin ] || $(BIN)/pip install --quiet --no-deps --force-reinstall -e ./sdk/python
	touch $(STAMP)

demo: $(STAMP) sdks docker-prereqs lambda-runtime
	$(BIN)/python examples/demo.py
	$(BIN)/python examples/polyglot_demo.py
	$(BIN)/python examples/knative_demo.py
	$(BIN)/python examples/lambda_demo.py

# The example plugin deployed to a local Lambda (moto + the real runtime in Docker), called.
demo-lambda: $(STAMP) lambda-runtime
	$(BIN)/python examples/lambda_demo.py

# The example plugin of every SDK folder present (sdk/<lang>/build.sh, idempotent); the
# conformance suite runs against each. Then the host clients (clients/<lang>/build.sh),
# which call the gateway rather than serve a plugin. Two at a time, Rust's first: it takes
# longest (scripts/build-sdks.sh). A build that fails fails the run.
# Only Python's needs the virtualenv: the others may build while it installs.
SDK_BUILDS := $(wildcard sdk/rust/build.sh) \
	$(filter-out sdk/rust/build.sh,$(wildcard sdk/*/build.sh)) $(wildcard clients/*/build.sh)
VENV_BUILDS := $(filter sdk/python/build.sh,$(SDK_BUILDS))
sdks: native-sdks venv-sdks
native-sdks:
	@VENV="$(abspath $(VENV))" bash scripts/build-sdks.sh $(filter-out $(VENV_BUILDS),$(SDK_BUILDS))
venv-sdks: $(STAMP)
	@VENV="$(abspath $(VENV))" bash scripts/build-sdks.sh $(VENV_BUILDS)

# Regenerate linchkit_plugin/_proto from proto/plugin.proto (tests fail when it is stale).
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

# The docker provider's tests need the engine and the offline base image; both scripts are
# idempotent (a second run costs about a second).
docker-engine:
	bash scripts/start-docker.sh

docker-prereqs: $(STAMP) docker-engine
	PYTHON=$(BIN)/python infra/docker/build-base-image.sh

# The local services tests start for themselves (etcd for the registry, dnsmasq for DNS
# discovery), from Debian's packages; idempotent and silent once installed.
services-prereqs:
	bash infra/services/install.sh

# Everything the tests need, three jobs at a time (each job's output printed whole when it
# ends): the Rust, Java and TypeScript builds take minutes of a clean clone and need no
# virtualenv, so they run while it installs and while the checks run. It is CPU that this
# part waits on either way, mostly Rust's compiler: one step after another it took 377 s of
# a clean clone's run (its Rust build 266 s), side by side 392 s with other work sharing
# the machine (Rust's build then 389 s); the overlap only fills what one step leaves idle.
# (The scripts that install Debian packages wait for each other's lock.)
test-prereqs: sdks checks docker-prereqs services-prereqs lambda-runtime rewritten-tests

# pytest rewrites each test module's asserts when it imports it, and keeps the result
# beside its bytecode, but not where PYTHONDONTWRITEBYTECODE is set (it is on the machines
# the suite runs on here): each worker then rewrote all ~330 test modules, 22 s of CPU each,
# 8.5 s once they are kept. Kept once here, beside the builds.
rewritten-tests: $(STAMP)
	@# Only a warm-up: a module that fails to collect is the real run's to report.
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest --collect-only -q -p no:cacheprovider > /dev/null || true

checks: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# pytest on three workers (pytest-xdist), a test file each at a time: most tests wait on
# processes, containers and sockets, so two workers took half the time of one (27 -> 12 min
# when measured), and a third took 16 % more off a run (1646 -> 1389 s, 2026-12-07) with the
# CPUs 87 % busy (a clean clone's .ci/run: 2137 -> 1712 s); the tests bound by time were
# made to hold with two others beside each.
# Files go to the workers in the order tests/conftest.py gives (the longest first), not
# xdist's (the most tests first), so no long file starts last while the others idle.
# Each file keeps its module fixtures on one worker.
test:
	@$(MAKE) --no-print-directory -j3 --output-sync=target test-prereqs
	@# The tests start the CLI and Python plugins some 1,800 times. Where PYTHONDONTWRITEBYTECODE
	@# is set (it is on the machines the suite runs on here) each start compiled the project's
	@# sources again: 1.5 s of CPU per CLI start instead of 1.0. Compiled once instead, in 1.5 s.
	$(BIN)/python -m compileall -q -j 0 dispatcher providers sdk/python examples tests bench
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=25; status=$$?; [ $$status -eq 5 ] && echo "no tests collected" && exit 1; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP) lambda-runtime
	$(BIN)/python -m bench

# The Lambda tests run handler code in the real AWS Lambda runtime, in local containers:
# a Docker engine and an image built from this machine's packages (idempotent, <1 s when built).
lambda-runtime: $(STAMP) docker-engine
	bash infra/lambda/build-runtime-image.sh $(BIN)/python

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
