"""What an authenticated caller may call: role rules on ``plugin[@version].method``.

``rules`` compiles the manifest's ``access`` section into ``AccessControl``; the
dispatcher checks every call against it (``Forbidden``) once ``access`` is configured.
"""

from __future__ import annotations

from dispatcher.access.rules import AccessControl

__all__ = ["AccessControl"]
