"""The local Lambda's one exception: the emulator itself cannot do its part.

``LocalLambdaError`` means the local Lambda cannot run: no Docker engine, no runtime image,
a container that failed or never listened, code it never saw, or it is not started. A
function's own failure is never this: that is an Invoke answer (see ``front``).
"""

from __future__ import annotations

__all__ = ["LocalLambdaError"]


class LocalLambdaError(RuntimeError):
    """The local Lambda cannot run: no Docker engine, no runtime image, a container failed."""
