#!/usr/bin/env bash
# Builds the Rust SDK and its example plugin (a cargo example, examples/example-plugin.rs)
# into sdk/rust/dist/example-plugin, from crates.io only (protoc comes from the
# protoc-bin-vendored crate). Idempotent: with nothing changed it takes a few seconds.
# Tests run in the release profile so they reuse the same compiled dependencies; set
# SKIP_TESTS=1 to skip them.
set -euo pipefail
cd "$(dirname "$0")"
jobs="${CARGO_BUILD_JOBS:-2}"   # the machine is shared: keep builds lean

cargo build --release --locked -j "$jobs" --example example-plugin
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    cargo test --release --locked -j "$jobs" --quiet --tests
fi
mkdir -p dist
# Copy only when changed, so a warm run leaves dist/ untouched.
cmp -s target/release/examples/example-plugin dist/example-plugin \
    || cp target/release/examples/example-plugin dist/example-plugin
echo "built sdk/rust/dist/example-plugin" >&2
