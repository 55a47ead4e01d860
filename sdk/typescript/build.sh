#!/usr/bin/env bash
# Builds the TypeScript SDK and its example plugin from the npm registry, then runs the
# SDK's tests. Leaves the package a consumer imports in sdk/typescript/dist (index.js,
# index.d.ts, … and proto/plugin.proto, what package.json's `files` ships), the example
# plugin and the tests compiled beside it (dist/examples, dist/test, never shipped), and
# the launcher dist/example-plugin. Idempotent: with nothing changed since the last good
# build it returns at once. Set SKIP_TESTS=1 to skip the tests (as the other SDKs' build.sh).
set -euo pipefail
cd "$(dirname "$0")"

STAMP=dist/.built
SOURCES=(src examples test package.json package-lock.json tsconfig.json tsconfig.test.json build.sh ../../proto/plugin.proto)

if [[ -f $STAMP && -x dist/example-plugin && -d node_modules ]] \
  && [[ -z $(find "${SOURCES[@]}" -newer "$STAMP" -print -quit) ]]; then
  echo "sdk/typescript: up to date"
  exit 0
fi

# Dependencies exactly as locked; only when the lock changed since the last install.
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

rm -f "$STAMP"
# The SDK (tsconfig.json: src only, into dist/), then the tests and the example against it
# as a consumer sees it (tsconfig.test.json: @linchkit/plugin-sdk, into dist/test and
# dist/examples).
node_modules/.bin/tsc -b tsconfig.test.json
mkdir -p dist/proto
cp ../../proto/plugin.proto dist/proto/plugin.proto

cat > dist/example-plugin <<'WRAPPER'
#!/bin/sh
# The TypeScript example plugin (built by sdk/typescript/build.sh).
exec node "$(dirname "$0")/examples/example-plugin.js" "$@"
WRAPPER
chmod +x dist/example-plugin

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  node --test dist/test/
fi
touch "$STAMP"
echo "sdk/typescript: built dist/example-plugin"
