#!/usr/bin/env bash
# Builds the Go SDK and its example plugin into sdk/go/dist/example-plugin, from the Go
# module proxy only. Idempotent: with nothing changed it takes a second or two (Go's build
# and test caches). Set SKIP_TESTS=1 to skip `go test`.
set -euo pipefail
cd "$(dirname "$0")"
export CGO_ENABLED=0   # a static binary: runs anywhere, even FROM scratch
# -trimpath for tests and build alike, so both reuse the same compiled packages.
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -trimpath"

PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2
proto=../../proto/plugin.proto
stamp=internal/pluginpb/plugin.proto.sha256

# The generated code is committed; regenerate it only when proto/plugin.proto changed.
if [ "$(sha256sum "$proto" | cut -d' ' -f1)" != "$(cat "$stamp" 2>/dev/null)" ]; then
    echo "proto/plugin.proto changed: regenerating sdk/go/internal/pluginpb" >&2
    if ! command -v protoc >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt=(apt-get -o DPkg::Lock::Timeout=300)  # other builds may hold dpkg's lock
            "${apt[@]}" install -y -q protobuf-compiler >/dev/null 2>&1 \
                || { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q protobuf-compiler >/dev/null; }
        else
            echo "protoc is missing: install Debian's protobuf-compiler" >&2; exit 1
        fi
    fi
    tools="$PWD/.tools/bin"
    GOBIN="$tools" go install "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
    GOBIN="$tools" go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"
    PATH="$tools:$PATH" protoc -I ../../proto \
        --go_out=internal/pluginpb --go_opt=paths=source_relative \
        --go-grpc_out=internal/pluginpb --go-grpc_opt=paths=source_relative \
        "$proto"
    sha256sum "$proto" | cut -d' ' -f1 > "$stamp"
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    go test ./...
fi
# The go.mod file of every module in the SDK's graph, older versions too: building needs
# only the pruned graph, but a plugin's `go get` of the SDK (the README's quick start, run
# offline by the tests) reads the whole of it.
go list -m all >/dev/null
mkdir -p dist
go build -ldflags="-s -w" -o dist/example-plugin ./cmd/example-plugin
# The same example for the wasm provider (docs/protocol.md, "WebAssembly"): the standard
# toolchain's WASI target, exports by //go:wasmexport, the Extism ABI from sdk/go/wasm.
GOOS=wasip1 GOARCH=wasm go vet ./wasm ./cmd/example-plugin-wasm
GOOS=wasip1 GOARCH=wasm go build -ldflags="-s -w" -buildmode=c-shared \
    -o dist/example-plugin.wasm ./cmd/example-plugin-wasm
echo "built sdk/go/dist/example-plugin and sdk/go/dist/example-plugin.wasm" >&2
