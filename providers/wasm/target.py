"""``provider: wasm``: the manifest's model of a WebAssembly plugin run in the dispatcher's
process (``docs/protocol.md``, "WebAssembly"). No runtime import: a manifest loads without
the ``wasm`` extra."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from providers.target import ManifestPath, TargetConfig

__all__ = ["DEFAULT_MEMORY_MB", "WasmTarget"]

#: Linear memory a plugin may grow to when its capabilities set no ``memory_mb``.
DEFAULT_MEMORY_MB = 128

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


class WasmTarget(TargetConfig):
    """``provider: wasm``: a WASI module speaking the Extism plugin ABI."""

    provider: Literal["wasm"]
    module: ManifestPath = Field(description="The .wasm file, relative to the manifest.")
    sha256: Sha256 = Field(
        description="The module's SHA-256: required, so a swapped or tampered file is refused."
    )
    instances: Literal["pooled", "fresh"] = Field(
        default="pooled",
        description="pooled: instances are reused, their memory survives between calls; "
        "fresh: a new instance per call, nothing survives.",
    )
    pool_size: int = Field(
        default=4, ge=1, le=256, description="At most this many calls run at once (threads)."
    )
    start_timeout_ms: int = Field(
        default=120_000,
        gt=0,
        description="How long attaching may take: compiling the module (seconds for a large "
        "one, when not cached) and running its start code, which no cancel reaches; past it "
        "the attach fails, and a thread still in the start code is left to end on its own.",
    )
    cache_dir: ManifestPath | None = Field(
        default=None,
        description="Keep compiled code here, keyed by the module and the runtime's version, "
        "so a restart skips compilation (default: a folder of the dispatcher's own, removed "
        "when it stops).",
    )

    def describe(self) -> str:
        return f"wasm {Path(self.module).name} ({self.instances}, {self.pool_size})"
