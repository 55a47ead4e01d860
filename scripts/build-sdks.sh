#!/usr/bin/env bash
# Runs the build scripts given (sdk/<lang>/build.sh, clients/<lang>/build.sh) side by side,
# at most SDK_BUILD_JOBS at a time (2 by default, the cores of the machine CI runs on), in
# the order given: name the longest first. Built one after another, the five SDKs took
# 7 minutes from a clean clone, the Rust one 4.5 of them; its compiler leaves a core idle for
# long stretches, which the other builds fill.
# Each build's output is kept and printed whole when it ends, so logs do not interleave.
# Every build runs to its end; then the script exits 1 naming each one that failed.
# Needs bash 5.1 or later (`wait -n -p`), as Debian 12 has.
set -euo pipefail
slots="${SDK_BUILD_JOBS:-2}"
if ! [[ $slots =~ ^[1-9][0-9]{0,2}$ ]]; then
    echo "SDK_BUILD_JOBS must be a whole number from 1 to 999, not '$slots'" >&2
    exit 2
fi
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

declare -A build_of=() log_of=() started_at=()
failed=()
started=0

# Waits for the next build to end and prints what it wrote.
collect() {
    local pid status=0
    wait -n -p pid || status=$?
    local build=${build_of[$pid]}
    echo "== $build: exit $status after $((SECONDS - started_at[$pid])) s"
    cat "${log_of[$pid]}"
    unset "build_of[$pid]" "log_of[$pid]" "started_at[$pid]"
    if [ "$status" != 0 ]; then failed+=("$build"); fi
}

for build in "$@"; do
    while [ "${#build_of[@]}" -ge "$slots" ]; do collect; done
    echo "building $build"
    started=$((started + 1))
    log="$logs/$started"
    bash "$build" > "$log" 2>&1 &
    build_of[$!]=$build
    log_of[$!]=$log
    started_at[$!]=$SECONDS
done
while [ "${#build_of[@]}" -gt 0 ]; do collect; done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
