"""What the HTTP server of a plugin lets one client cost it, in one frozen value.

Each limit guards one resource against one kind of client, broken or hostile:

    limit                 guards                                     answer when passed
    max_body_bytes        memory: a body is read whole before JSON   413, before reading
                          parsing (checked on Content-Length, then   when Content-Length
                          again while a chunked body arrives)        says so
    max_batch_items       CPU and memory: every item of a batch      413, before any item
                          runs concurrently                          runs
    body_timeout          a request slot: a Content-Length that      408, connection closed
                          lies, a chunked body that never ends
    header_timeout        a connection: slowloris, a head that       connection closed
                          never completes, an idle new connection    (408 if a head began)
    keep_alive_timeout    a connection idle between requests         connection closed
    max_header_bytes      memory: headers uvicorn buffers unbounded  431, connection closed
    max_connections       file descriptors and memory                new connections closed
    compress_min_bytes    the link: answers this large or larger     (compressed when the
                          go in a coding the dispatcher accepts      caller accepts it)

``max_body_bytes`` also caps a compressed request body once decoded (413 for a bomb).

``dispatcher-plugin serve`` sets every one from a CLI option or a ``LINCHKIT_PLUGIN_*``
variable; ``PluginApp`` enforces the first three, the uvicorn glue (``_uvicorn``) the rest.
Each has a most it may be set to (a day for a timeout; ``ValueError`` past it): ``inf``
for a timeout turned its guard off without a word.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_TIMEOUT_SECONDS", "ServerLimits"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    """Bounds on what one request or connection may cost; the defaults suit a plugin server."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_items: int = 1000
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    #: Longer than any host keeps an idle connection for reuse (the dispatcher's pool:
    #: ``idle_timeout_s``, 30 s by default), so the host always closes first.
    keep_alive_timeout: float = 75.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1000
    compress_min_bytes: int = 32 * 1024

    def __post_init__(self) -> None:
        for name, most in _MOST.items():
            value = getattr(self, name)
            if name != "compress_min_bytes" and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
            if value > most:
                raise ValueError(f"{name} must be at most {most}, not {value}")
        for name in ("body_timeout", "header_timeout", "keep_alive_timeout"):
            # NaN fails too; inf (or 1e308) turned a guard off unsaid.
            if not 0 < getattr(self, name) <= MAX_TIMEOUT_SECONDS:
                raise ValueError(
                    f"{name} must be a positive number of seconds, at most"
                    f" {MAX_TIMEOUT_SECONDS} (a day), not {getattr(self, name)!r}"
                )


#: The longest any of the timeouts may be: a day. More is a mistake in the unit, or a
#: guard turned off (``inf``) without saying so.
MAX_TIMEOUT_SECONDS = 86_400
#: The most each count may be: past it a limit is a mistake, not a limit (a gigabyte body,
#: 16 MB of headers, a million connections or batch items).
_MOST = {
    "max_body_bytes": 1 << 30,
    "max_batch_items": 1_000_000,
    "max_header_bytes": 16 << 20,
    "max_connections": 1_000_000,
    "compress_min_bytes": 1 << 30,
}
