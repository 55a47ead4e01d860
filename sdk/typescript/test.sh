#!/usr/bin/env bash
# Runs the TypeScript SDK's tests (node:test), building first if anything changed.
set -euo pipefail
cd "$(dirname "$0")"
./build.sh >/dev/null
exec node --test dist/test/
