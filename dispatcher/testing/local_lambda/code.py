"""Function code: the zips seen going to moto, kept by ``CodeSha256``, unpacked for containers.

moto keeps a function's configuration but the local runtime needs its files, so the
control plane pass-through (``control``) hands every successful ``CreateFunction`` and
``UpdateFunctionCode`` with a ``ZipFile`` to ``CodeStore.remember``, keyed by the
``CodeSha256`` moto answered. ``CodeStore.directory`` unpacks a function's zip once into
the work directory and returns the folder ``runtime`` mounts read-only at ``/var/task``.
Code that never went through this endpoint (S3, another endpoint) is a ``LocalLambdaError``.

The work directory is a fresh temporary one unless given; ``close()`` deletes it only then.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import orjson

from dispatcher.testing.local_lambda.errors import LocalLambdaError
from dispatcher.testing.local_lambda.function import Function

__all__ = ["CodeStore"]


class CodeStore:
    """Zips by ``CodeSha256``, unpacked on demand under one work directory."""

    def __init__(self, work_dir: str | os.PathLike[str] | None = None) -> None:
        self._own_work_dir = work_dir is None
        self._work_dir = Path(work_dir or tempfile.mkdtemp(prefix="local-lambda-"))
        self._zips: dict[str, bytes] = {}

    def remember(self, path: str, request_body: bytes, answer: bytes) -> None:
        """Keep the zip of a successful ``CreateFunction``/``UpdateFunctionCode``, if any."""
        creating = path.rstrip("/").endswith("/functions")
        updating = path.endswith("/code")
        if not (creating or updating):
            return
        try:
            sent = orjson.loads(request_body)
            received = orjson.loads(answer)
        except orjson.JSONDecodeError:
            return
        encoded = (sent.get("Code") or {}).get("ZipFile") if creating else sent.get("ZipFile")
        sha = received.get("CodeSha256") if isinstance(received, dict) else None
        if isinstance(encoded, str) and isinstance(sha, str):
            try:
                self._zips[sha] = base64.b64decode(encoded)
            except binascii.Error:
                return

    def directory(self, function: Function) -> Path:
        """The function's code, unpacked (once per zip content) and readable by any user."""
        zipped = self._zips.get(function.code_sha256)
        if zipped is None:
            raise LocalLambdaError(
                f"the local Lambda has no code for {function.name} ({function.code_sha256}); "
                "create the function through this endpoint, with ZipFile"
            )
        folder = self._work_dir / hashlib.sha256(zipped).hexdigest()
        if not folder.exists():
            # Unpacked beside and renamed into place, so a folder that exists is complete.
            partial = folder.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
                archive.extractall(partial)
            # Readable by any user: the container reads the mount under its own uid, with
            # every capability dropped (``runtime``), so file modes are all that count.
            for path in partial.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            partial.rename(folder)
            folder.chmod(0o755)
        return folder

    def close(self) -> None:
        """Delete the work directory, if this store made it."""
        if self._own_work_dir:
            shutil.rmtree(self._work_dir, ignore_errors=True)
