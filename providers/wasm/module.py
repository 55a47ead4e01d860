"""A wasm plugin's module file, read and checked against its pin before anything compiles it.

Reading and hashing happen once per attach, on the bytes that are then compiled, so the
file cannot change between the check and its use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from linchkit_plugin.errors import ProviderError

__all__ = ["ModuleRefused", "PinnedModule", "read_pinned"]


class ModuleRefused(ProviderError):
    """The module file is missing, unreadable, or not the one the manifest pins."""


@dataclass(frozen=True, slots=True)
class PinnedModule:
    path: Path
    sha256: str
    code: bytes

    def __repr__(self) -> str:
        return f"<PinnedModule {self.path.name} sha256={self.sha256[:12]}… {len(self.code)} bytes>"


def read_pinned(path: Path, sha256: str) -> PinnedModule:
    """The bytes of ``path`` if their SHA-256 is ``sha256``; ``ModuleRefused`` otherwise."""
    try:
        code = path.read_bytes()
    except OSError as error:
        raise ModuleRefused(f"cannot read the wasm module {path}: {error.strerror}") from error
    digest = hashlib.sha256(code).hexdigest()
    if digest != sha256.lower():
        raise ModuleRefused(
            f"the wasm module {path} has SHA-256 {digest}, the manifest pins {sha256.lower()}: "
            "refusing a module that is not the one pinned (rebuild it or update the pin)",
            details={"path": str(path), "expected": sha256.lower(), "actual": digest},
        )
    return PinnedModule(path, digest, code)
