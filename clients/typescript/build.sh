#!/usr/bin/env bash
# Builds the TypeScript host client (the gateway's client for Node hosts) from the npm
# registry: leaves clients/typescript/dist/lib. Idempotent: with nothing changed since
# the last good build it returns at once. Its tests need a running gateway, so they run
# from test.sh and tests/test_ts_client.py, not here.
set -euo pipefail
cd "$(dirname "$0")"

STAMP=dist/.built
SOURCES=(src test package.json package-lock.json tsconfig.json build.sh)

if [[ -f $STAMP && -d node_modules ]] \
  && [[ -z $(find "${SOURCES[@]}" -newer "$STAMP" -print -quit) ]]; then
  echo "clients/typescript: up to date"
  exit 0
fi

# Dependencies exactly as locked; only when the lock changed since the last install.
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

rm -f "$STAMP"
node_modules/.bin/tsc -p tsconfig.json
touch "$STAMP"
echo "clients/typescript: built dist/lib"
