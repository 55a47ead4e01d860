"""``provider: subprocess``: the manifest's model of a plugin executable the dispatcher
launches and owns (``docs/grpc-and-subprocess.md``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from providers.target import TargetConfig

__all__ = ["SubprocessTarget"]


class SubprocessTarget(TargetConfig):
    """``provider: subprocess``: a plugin executable the dispatcher launches and owns."""

    provider: Literal["subprocess"]
    command: list[str] = Field(
        min_length=1, description="The executable (relative to the manifest) and its arguments."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Refuse to run the executable unless its SHA-256 is this.",
    )
    network: Literal["unix", "tcp"] = "unix"
    auto_mtls: bool = Field(default=True, description="One-time mutual TLS per launch.")
    protocol_versions: list[int] = Field(default_factory=lambda: [1], min_length=1)
    handshake_timeout_ms: int = Field(default=10_000, gt=0)
    health_interval_ms: int = Field(default=5_000, ge=0, description="0: no health pings.")
    health_failures: int = Field(default=3, gt=0, description="Failed pings before a kill.")
    restart: bool = True
    max_restarts: int = Field(default=5, ge=0)
    restart_window_s: float = Field(default=60.0, gt=0)
    restart_backoff_ms: int = Field(default=100, gt=0)
    restart_backoff_max_ms: int = Field(default=5_000, gt=0)
    stop_grace_ms: int = Field(default=3_000, gt=0)
    events: bool = True
    batch: bool = True

    @field_validator("command")
    @classmethod
    def _executable_relative_to_manifest(
        cls, command: list[str], info: ValidationInfo
    ) -> list[str]:
        executable = command[0]
        if os.sep in executable and not os.path.isabs(executable):
            base = (info.context or {}).get("base_dir", Path.cwd())
            executable = str((Path(base) / executable).resolve())
        return [executable, *command[1:]]

    def describe(self) -> str:
        return f"subprocess {Path(self.command[0]).name}"
