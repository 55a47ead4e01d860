"""The base of every model a manifest is read into, and the path type it uses.

``StrictModel`` forbids unknown keys, freezes what it loaded and never prints a secret;
``ManifestPath`` takes relative paths from the manifest's folder. They live apart from
``providers.target`` so that models the target seam itself refers to (``providers.
capabilities``) can build on them without an import circle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, AnyUrl, BaseModel, ConfigDict, ValidationInfo

__all__ = ["MASK", "ManifestPath", "StrictModel", "masked_url"]

#: What a secret prints as.
MASK = "***"


def masked_url(url: str | AnyUrl) -> str:
    """``url`` with its password replaced by ``***``, for messages and listings; a user
    without a password is masked whole (it is sent as the credential: a token as user)."""
    text = str(url)
    if "@" not in text:
        return text
    parts = urlsplit(text)
    if "@" not in parts.netloc:
        return text
    host = parts.netloc.rpartition("@")[2]
    if parts.password is None:
        return urlunsplit(parts._replace(netloc=f"{MASK}@{host}"))
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def _masked(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: MASK for key in value}
    if isinstance(value, list | tuple):
        return [MASK for _ in value]
    return MASK if value else value


class StrictModel(BaseModel):
    """A manifest model: unknown keys are errors, and nothing changes once loaded.

    No number in a manifest is NaN or infinite (YAML's ``.nan``, ``.inf``): NaN passes no
    bound but is not refused by one either where a field has none, and an infinite rate,
    backoff or size means a limit that is not one."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    #: Fields whose values are secrets (a mapping's values, a list's items): their keys
    #: still show in ``repr``/``str``, their values print as ``***``.
    secret_fields: ClassVar[frozenset[str]] = frozenset()

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name in self.secret_fields:
                yield name, _masked(value)
            elif isinstance(value, AnyUrl) or (isinstance(value, str) and "://" in value):
                yield name, masked_url(value)
            else:
                yield name, value


def _relative_to_manifest(path: Path, info: ValidationInfo) -> Path:
    if path.is_absolute():
        return path
    base = (info.context or {}).get("base_dir", Path.cwd())
    return (Path(base) / path).resolve()


#: A path in a manifest: relative paths are taken from the manifest's folder.
ManifestPath = Annotated[Path, AfterValidator(_relative_to_manifest)]
