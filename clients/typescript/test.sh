#!/usr/bin/env bash
# Runs the host client's tests (node:test) against real `dispatcher serve` processes,
# building first if anything changed. LINCHKIT_PYTHON (or VENV) names the interpreter
# that has the dispatcher; default: the checkout's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")"
./build.sh >/dev/null
exec node --test --test-concurrency=1 dist/lib/test/*.test.js
