"""The base of every model a manifest is read into, and the path type it uses.

``StrictModel`` forbids unknown keys, freezes what it loaded and never prints a secret;
``ManifestPath`` takes relative paths from the manifest's folder; ``EnvVars``, ``Argv``
and ``ImageReference`` are what several providers' targets hold, checked alike. They live apart from
``providers.target`` so that models the target seam itself refers to (``providers.
capabilities``) can build on them without an import circle.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    AnyUrl,
    BaseModel,
    ConfigDict,
    ValidationInfo,
    model_validator,
)

from linchkit_plugin._setting_files import file_kind

__all__ = [
    "MASK",
    "Argv",
    "EnvVars",
    "ImageReference",
    "ManifestPath",
    "StrictModel",
    "masked_url",
]

#: What a secret prints as.
MASK = "***"

#: What a URL too broken to split prints as (its password could be anywhere in it).
UNREADABLE_URL = "(a URL that does not parse)"


def masked_url(url: str | AnyUrl) -> str:
    """``url`` as messages and listings show it: its password, its query's values and its
    fragment replaced by ``***``. A user without a password is masked whole (it is sent as
    the credential: a token as user); a query's names stay, since ``?token=``, a presigned
    ``X-Amz-Signature=`` or an OAuth fragment are credentials as much as a password is."""
    text = str(url)
    if "@" not in text and "?" not in text and "#" not in text:
        return text  # the common case, without parsing
    try:
        parts = urlsplit(text)
    except ValueError:  # a bad IPv6 literal: nothing in it can be told apart safely
        return UNREADABLE_URL
    return urlunsplit(
        parts._replace(
            netloc=_masked_netloc(parts),
            query=_masked_query(parts.query),
            fragment=MASK if parts.fragment else "",
        )
    )


def _masked_netloc(parts: SplitResult) -> str:
    if "@" not in parts.netloc:
        return parts.netloc
    host = parts.netloc.rpartition("@")[2]
    if parts.password is None:
        return f"{MASK}@{host}"
    return f"{parts.username or ''}:{MASK}@{host}"


def _masked_query(query: str) -> str:
    """Each ``name=value`` item as ``name=***``; an item without ``=`` is a value itself."""
    if not query:
        return ""
    items = (item.partition("=") for item in query.split("&"))
    return "&".join(f"{name}={MASK}" if equals else MASK for name, equals, _ in items)


def _masked(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: MASK for key in value}
    if isinstance(value, list | tuple):
        return [MASK for _ in value]
    return MASK if value else value


#: Integers in a manifest stay below this in magnitude (signed 64 bits).
_INT64 = 2**63


def _huge_integer(value: Any) -> int | None:
    """An integer of 64 bits or more in ``value`` or the lists and maps it holds (a nested
    model checks its own fields)."""
    if type(value) is int:
        return value if not -_INT64 <= value < _INT64 else None
    if isinstance(value, list | tuple):
        items: Any = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        return None
    return next((huge for item in items if (huge := _huge_integer(item)) is not None), None)


class StrictModel(BaseModel):
    """A manifest model: unknown keys are errors, and nothing changes once loaded.

    No number in a manifest is NaN or infinite (YAML's ``.nan``, ``.inf``): NaN passes no
    bound but is not refused by one either where a field has none, and an infinite rate,
    backoff or size means a limit that is not one. No integer is 2**63 or more either:
    none such is a size or a time anyone means, and one stopped ``Dispatcher`` start with
    a bare ``TypeError`` (a target's key is its JSON, which holds 64-bit integers)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _integers_fit_64_bits(self) -> Self:
        for name, value in self.__dict__.items():
            huge = _huge_integer(value)
            if huge is not None:
                raise ValueError(f"{name}: {str(huge)[:24]}… is beyond any sensible bound")
        return self

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
    if not path.is_absolute():
        base = (info.context or {}).get("base_dir", Path.cwd())
        path = (Path(base) / path).resolve()
    _refuse_special(path)
    return path


def _refuse_special(path: Path) -> None:
    """A manifest's paths name files and folders (TLS files, modules, build contexts): one
    naming a FIFO made whoever read it wait for a writer for ever (OpenSSL loading a
    ``ca_file``, on the event loop), a device read without end. A path that does not
    exist yet is the provider's to report when it needs it."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ValueError(f"{path} is {file_kind(mode)}, not a file or a folder")


#: A path in a manifest: relative paths are taken from the manifest's folder; one naming a
#: FIFO, a socket or a device is refused.
ManifestPath = Annotated[Path, AfterValidator(_relative_to_manifest)]


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _checked_env(env: dict[str, str]) -> dict[str, str]:
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"environment variable name {name[:40]!r}: letters, digits, '_'")
        if "\0" in value:
            raise ValueError(f"the value of {name} holds a NUL, which no environment can")
    return env


def _checked_argv(argv: list[str]) -> list[str]:
    if any("\0" in argument for argument in argv):
        raise ValueError("a command's arguments cannot hold a NUL")
    return argv


#: Environment variables a manifest gives a process or container: names as shells take
#: them (``A=B`` as a name set another variable), no NUL in a value (``exec`` refuses it:
#: it stopped ``Dispatcher`` start with a bare ``ValueError``).
EnvVars = Annotated[dict[str, str], AfterValidator(_checked_env)]
#: A command line a manifest gives a process or container: no NUL in any argument.
Argv = Annotated[list[str], AfterValidator(_checked_argv)]


# Docker's grammar of an image reference (github.com/distribution/reference, regexp.go):
# [domain[:port]/]path-component(/path-component)*[:tag][@digest]. Character classes are
# spelt out: Go's \w is ASCII, Python's is not.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_REFERENCE = re.compile(rf"(?P<name>{_NAME})(?::{_TAG})?(?:@(?P<digest>.*))?", re.DOTALL)
#: The digests the engine takes: go-digest's algorithms, lowercase hex of their size
#: (the grammar's ``algorithm:hex`` is wider, but the engine refuses the rest).
_KNOWN_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")
#: The longest name the engine takes (reference.NameTotalLengthMax), and the longest
#: reference: that name, a tag and a sha512 digest.
_MAX_NAME = 255
_MAX_REFERENCE = _MAX_NAME + 1 + 128 + 1 + len("sha512:") + 128


def _checked_image(image: str) -> str:
    """``image`` if it is a reference as Docker writes it; else ``ValueError``, never
    quoting it. The engine client puts the reference into API paths (``GET
    /images/{image}/json``) and a Python plugin's Dockerfile (``FROM``), so ``a/json?x=1``
    or ``../containers/abc`` reached the engine as another request, and a line break in
    ``base_image`` as another Dockerfile instruction; a Knative Service carrying a bad one
    was applied, and the cluster said so only when it failed to pull it."""
    match = _REFERENCE.fullmatch(image) if len(image) <= _MAX_REFERENCE else None
    if match is None:
        lowercase = len(image) <= _MAX_REFERENCE and _REFERENCE.fullmatch(image.lower())
        raise ValueError(
            "an image reference is [registry[:port]/]name[:tag][@digest], e.g."
            " linchkit/echo:1.0.0: a name of lowercase letters and digits joined by '.',"
            " '_', '__' or '-' in parts separated by '/', a tag of at most 128 letters,"
            " digits, '_', '.' and '-', no spaces"
            + (" (the name has capitals: Docker takes lowercase names only)" if lowercase else "")
        )
    if len(match["name"]) > _MAX_NAME:
        raise ValueError(f"an image name (before its tag) is at most {_MAX_NAME} characters")
    digest = match["digest"]
    if digest is not None and not _KNOWN_DIGEST.fullmatch(digest):
        raise ValueError(
            "an image digest is sha256: and 64 lowercase hex digits (or sha384: 96, sha512: 128)"
        )
    return image


#: An image a manifest names (a Docker target's, a Knative deployment's), checked when it
#: loads against Docker's reference grammar, which Kubernetes and its registries share.
ImageReference = Annotated[str, AfterValidator(_checked_image)]
