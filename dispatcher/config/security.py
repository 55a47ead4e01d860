"""Who may call, what they may call, and where calls are recorded: ``auth``, ``access``, ``audit``.

The models only. ``dispatcher.identity`` turns ``auth`` into an authenticator,
``dispatcher.access`` compiles ``access`` into its checks, ``dispatcher.audit`` opens the
log ``audit`` names. No secret is ever written in a manifest: an API key is stored as the
SHA-256 of the key, JWTs are verified with public keys only (no shared HMAC secrets, so
``HS*`` algorithms are refused outright rather than configured).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from providers._headers import checked_url
from providers.target import StrictModel

__all__ = [
    "JWT_ALGORITHMS",
    "AccessConfig",
    "ApiKey",
    "AuditConfig",
    "AuthConfig",
    "JwtConfig",
    "MtlsIdentity",
    "RoleRules",
]

#: Asymmetric algorithms only: with a public key set, an HMAC algorithm would let anyone
#: holding the (public) key sign tokens — the classic "HS256 signed with the RSA key" attack.
JWT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

_SHA256_HEX = r"^[0-9a-f]{64}$"
_PRINCIPAL = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
_ROLE = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]

#: ``plugin[@version-glob].method`` with fnmatch globs (``*``, ``?``, ``[…]``), ASCII only.
_RULE = re.compile(r"^[A-Za-z0-9_.*?\[\]!@-]+\Z")


class ApiKey(StrictModel):
    """One API key: the key itself never appears, only the SHA-256 (hex) of its bytes."""

    principal: _PRINCIPAL
    sha256: Annotated[str, Field(pattern=_SHA256_HEX)]
    roles: tuple[_ROLE, ...] = ()

    # Not a secret (a digest), but nothing a listing or an error needs to show.
    secret_fields = frozenset({"sha256"})


class JwtConfig(StrictModel):
    """Bearer tokens signed by an issuer whose public keys (a JWKS) the dispatcher reads."""

    jwks: str = Field(description="A JWKS file (relative to the manifest) or an http(s) URL.")
    algorithms: Annotated[tuple[str, ...], Field(min_length=1)] = ("RS256", "ES256", "EdDSA")
    issuer: str | None = None
    audience: str | None = None
    leeway_s: Annotated[float, Field(ge=0, le=300)] = 30
    principal_claim: Annotated[str, Field(min_length=1, max_length=64)] = "sub"
    #: Put before every token's principal id: one namespace of principals is shared by
    #: api_keys, mtls and jwt (a service may present a key or a token and be one principal,
    #: with one set of jobs, caches and limits), so an issuer whose subjects others choose
    #: must not name the principals keys and certificates prove (docs/security.md).
    principal_prefix: Annotated[str, Field(max_length=64, pattern=r"^[!-~]*$")] = ""
    roles_claim: Annotated[str, Field(min_length=1, max_length=64)] | None = "roles"
    fetch_timeout_s: Annotated[float, Field(gt=0, le=30)] = 3
    #: An unknown ``kid`` makes the dispatcher fetch a URL's JWKS again, at most this often:
    #: tokens with made-up kids must not turn into a flood of requests to the issuer.
    refetch_min_interval_s: Annotated[float, Field(ge=0, le=3600)] = 30
    #: Verified tokens kept (by their exact text, until they expire).
    cache_size: Annotated[int, Field(ge=0, le=1_000_000)] = 4096

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: tuple[str, ...]) -> tuple[str, ...]:
        for algorithm in algorithms:
            if algorithm not in JWT_ALGORITHMS:
                raise ValueError(
                    f"algorithm {algorithm!r} is not allowed; one of: {', '.join(JWT_ALGORITHMS)}"
                    " (HMAC and 'none' are refused: the keys come from a public JWKS)"
                )
        return algorithms

    @field_validator("jwks")
    @classmethod
    def _file_or_url(cls, jwks: str, info: ValidationInfo) -> str:
        scheme = urlsplit(jwks).scheme
        if scheme in ("http", "https"):
            checked_url(jwks)  # urlsplit drops a line break or tab without a word
            if not urlsplit(jwks).hostname:
                raise ValueError("the JWKS URL names no host")
            return jwks
        if scheme and len(scheme) > 1:  # a drive letter is not a scheme
            raise ValueError(f"the JWKS must be a file or an http(s) URL, not {scheme}:")
        path = Path(jwks)
        if not path.is_absolute():
            path = Path((info.context or {}).get("base_dir", Path.cwd())) / path
        return str(path.resolve())

    @property
    def jwks_is_url(self) -> bool:
        return urlsplit(self.jwks).scheme in ("http", "https")


class MtlsIdentity(StrictModel):
    """A client certificate the TLS layer verified, by its exact subject or one SAN."""

    subject: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="Exact RFC 4514 subject, e.g. 'CN=billing,O=Acme'."
    )
    san: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="Exact subject alternative name, e.g. 'spiffe://acme/billing'."
    )
    principal: _PRINCIPAL
    roles: tuple[_ROLE, ...] = ()

    @model_validator(mode="after")
    def _subject_or_san(self) -> MtlsIdentity:
        if (self.subject is None) == (self.san is None):
            raise ValueError("an mtls entry names exactly one of 'subject' or 'san'")
        return self


class AuthConfig(StrictModel):
    """How callers of the gateway prove who they are."""

    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtConfig | None = None
    mtls: tuple[MtlsIdentity, ...] = ()

    @model_validator(mode="after")
    def _no_duplicates(self) -> AuthConfig:
        digests = [key.sha256 for key in self.api_keys]
        if len(set(digests)) != len(digests):
            raise ValueError("two api_keys have the same sha256: one key, one principal")
        names = [(entry.subject, entry.san) for entry in self.mtls]
        if len(set(names)) != len(names):
            raise ValueError("two mtls entries name the same subject or san")
        return self


class RoleRules(StrictModel):
    """What one role may call: ``plugin[@version-glob].method`` patterns; deny beats allow."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @field_validator("allow", "deny")
    @classmethod
    def _patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            if not _RULE.match(pattern) or pattern.count("@") > 1:
                raise ValueError(
                    f"{pattern!r} is not a rule: expected plugin[@version].method with"
                    " ASCII names and the globs * ? [...]"
                )
            if "." not in pattern and pattern != "*":
                raise ValueError(f"{pattern!r} names no method: write plugin.method or plugin.*")
        return patterns


class AccessConfig(StrictModel):
    """Role-based access: once present, a call is refused unless a role of its caller allows it."""

    roles: dict[_ROLE, RoleRules] = Field(default_factory=dict)


class AuditConfig(StrictModel):
    """One JSON line per call, hash-chained (``dispatcher audit verify``)."""

    path: str = Field(
        description=(
            "A file (appended to, relative to the manifest), a named pipe a log shipper"
            " reads, or '-' for stdout."
        )
    )
    max_backlog: int = Field(
        default=100_000,
        # The writer gathers records for 5 ms between writes: a bound below what a
        # burst queues meanwhile would refuse calls while the sink is fine.
        ge=1_000,
        le=10_000_000,
        description=(
            "Records waiting for the sink at most; past it calls are refused (Overloaded)"
            " until it takes them, and one record counts the refusals."
        ),
    )

    @field_validator("path")
    @classmethod
    def _relative_to_manifest(cls, path: str, info: ValidationInfo) -> str:
        if path == "-":
            return path
        if not path:
            raise ValueError("the audit path is empty; a file, or '-' for stdout")
        file = Path(path)
        if not file.is_absolute():
            file = Path((info.context or {}).get("base_dir", Path.cwd())) / file
        return str(file.resolve())

    @property
    def to_stdout(self) -> bool:
        return self.path == "-"
