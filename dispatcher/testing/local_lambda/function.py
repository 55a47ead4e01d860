"""One function version as the local Lambda runs it: what moto's configuration says.

``Function`` is built by ``control`` from moto's ``GetFunction`` answer
(``Function.from_configuration``), with Lambda's defaults for what moto leaves out (version
``$LATEST``, timeout 3 s, 128 MB). ``Function.key`` identifies an execution environment:
two invocations may share a warm container only if their keys are equal, that is the same
name, version, handler, runtime, limits, code and environment variables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["Function"]


@dataclass
class Function:
    """What running one function version needs, from its configuration in moto."""

    name: str
    version: str
    handler: str
    runtime: str
    timeout: int
    memory_mb: int
    code_sha256: str
    environment: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any]) -> Function:
        """From the ``Configuration`` of a ``GetFunction`` answer."""
        return cls(
            name=configuration["FunctionName"],
            version=configuration.get("Version") or "$LATEST",
            handler=configuration.get("Handler") or "",
            runtime=configuration.get("Runtime") or "",
            timeout=int(configuration.get("Timeout") or 3),
            memory_mb=int(configuration.get("MemorySize") or 128),
            code_sha256=configuration.get("CodeSha256") or "",
            environment=dict((configuration.get("Environment") or {}).get("Variables") or {}),
        )

    @property
    def key(self) -> str:
        parts = orjson.dumps(
            [
                self.name,
                self.version,
                self.handler,
                self.runtime,
                self.timeout,
                self.memory_mb,
                self.code_sha256,
                self.environment,
            ],
            option=orjson.OPT_SORT_KEYS,
        )
        return hashlib.sha256(parts).hexdigest()[:24]
