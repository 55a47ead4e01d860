"""The audit log: exactly one hash-chained JSON line per call (``docs/security.md``).

``chain`` defines the line format, sealing and ``verify``; ``log`` appends to a file or
stdout from a writer thread. The dispatcher writes the records (``dispatcher._guard``);
``dispatcher audit verify FILE`` checks a log.
"""

from __future__ import annotations

from dispatcher.audit.chain import GENESIS, ChainReport, seal, verify, verify_lines
from dispatcher.audit.log import AuditLog, AuditLogError, timestamp

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditLogError",
    "ChainReport",
    "seal",
    "timestamp",
    "verify",
    "verify_lines",
]
