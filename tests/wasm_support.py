"""What the wasm tests share: the hostile plugin built once per run with the standard Go
toolchain (offline, like every SDK build), and manifests for it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.sdk_toolchains import GO, OFFLINE, require, succeed

HOSTILE = ROOT / "tests" / "plugins" / "wasm_hostile"
HOSTILE_METHODS = (
    "echo",
    "spin",
    "hog",
    "read_file",
    "write_file",
    "env",
    "environ",
    "remember",
    "crash",
    "fetch",
)


def build_hostile(out: Path) -> Path:
    require(GO)
    module = out / "hostile.wasm"
    succeed(
        [
            GO,
            "build",
            "-trimpath",
            "-buildvcs=false",
            "-buildmode=c-shared",
            "-o",
            str(module),
            ".",
        ],
        HOSTILE,
        GOOS="wasip1",
        GOARCH="wasm",
        GOFLAGS="-mod=mod",
        **OFFLINE,
    )
    return module


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wasm_plugin(
    module: Path,
    *,
    plugin_id: str = "hostile",
    methods: tuple[str, ...] = HOSTILE_METHODS,
    capabilities: dict[str, Any] | None = None,
    **target: Any,
) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "version": "1.0.0",
        "target": {
            "provider": "wasm",
            "module": str(module),
            "sha256": sha256_of(module),
            **target,
        },
        "capabilities": capabilities or {},
        "methods": {name: {} for name in methods},
    }
