#!/usr/bin/env bash
# Builds the Rust SDK and its example plugin (example-plugin/, a crate that depends on the
# SDK by path, as a plugin author's does) into sdk/rust/dist/example-plugin, from crates.io
# only (protoc comes from the protoc-bin-vendored crate). Idempotent: with nothing changed
# it takes a few seconds.
# Set SKIP_TESTS=1 to skip the tests.
set -euo pipefail
cd "$(dirname "$0")"
jobs="${CARGO_BUILD_JOBS:-2}"   # the machine is shared: keep builds lean

# Into the SDK's target/: the SDK compiled for the example is the one every plugin crate
# built there with the same dependencies reuses (the tests' scaffold and quick start).
CARGO_TARGET_DIR="$PWD/target" cargo build --release --locked -j "$jobs" \
    --manifest-path example-plugin/Cargo.toml
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    # The tests reuse the dependencies just compiled (release profile) but compile the SDK's
    # own code as `cargo test` would: unoptimised, with debug assertions and overflow checks.
    # Optimised, its unit and integration tests took 100 s of a clean build's 268 to compile;
    # so, 18 s. The example plugin above stays optimised, as a plugin author's release is.
    sdk_as_tested="profile.release.package.linchkit-plugin"
    cargo test --release --locked -j "$jobs" --quiet --tests \
        --config "$sdk_as_tested.opt-level=0" \
        --config "$sdk_as_tested.debug-assertions=true" \
        --config "$sdk_as_tested.overflow-checks=true"
fi
mkdir -p dist
# Copy only when changed, so a warm run leaves dist/ untouched.
cmp -s target/release/example-plugin dist/example-plugin \
    || cp target/release/example-plugin dist/example-plugin
echo "built sdk/rust/dist/example-plugin" >&2
