"""Version ranges: ``^1.2``, ``~1.2.3``, ``1.x``, ``>=1.0 <2`` → the highest version in range.

npm/Cargo semantics, as plugin authors know them from their package managers: a caret
keeps the left-most non-zero part, a tilde the minor, ``x``/``*`` match any part, and a
pre-release only matches a range that names a pre-release of the same ``major.minor.patch``.
``semantic_version`` (its ``NpmSpec``) implements them; this is the one module importing it,
so its ``ValueError`` becomes ``InvalidParams`` here.

The protocol versions the dispatcher speaks live here too: a plugin declaring another one
(``protocol:`` in its manifest entry, or reported by its transport at attach) is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

from semantic_version import NpmSpec, Version

from linchkit_plugin.errors import InvalidParams, ProviderError
from linchkit_plugin.wire import PROTOCOL_VERSION

__all__ = ["SUPPORTED_PROTOCOLS", "check_protocol", "highest_in_range", "in_range", "version_key"]

#: The plugin protocol versions this dispatcher speaks (``docs/protocol.md``).
SUPPORTED_PROTOCOLS: frozenset[int] = frozenset({PROTOCOL_VERSION})


def check_protocol(plugin: str, protocol: int | None) -> None:
    """Refuse ``plugin`` (``id@version``) declaring a protocol this dispatcher does not
    speak, before any of its processes start."""
    if protocol is not None and protocol not in SUPPORTED_PROTOCOLS:
        spoken = ", ".join(map(str, sorted(SUPPORTED_PROTOCOLS)))
        raise ProviderError(
            f"{plugin} speaks plugin protocol {protocol}; this dispatcher speaks"
            f" {spoken}: refusing to attach it (upgrade the dispatcher or use a build of the"
            " plugin for a protocol it speaks)",
            details={"plugin": plugin, "protocol": protocol},
        )


#: A range string longer than this is refused before parsing: it comes from callers
#: (the gateway's ``X-Plugin-Version`` header), and no real range needs more.
MAX_RANGE_LENGTH = 256


def version_key(version: str) -> tuple[Sequence[int], bool, str]:
    """Semantic version order: a release above its pre-releases (build metadata ignored)."""
    core, _, rest = version.partition("+")[0].partition("-")
    return tuple(int(part) for part in core.split(".")), not rest, rest


@lru_cache(maxsize=1024)  # bounded: ranges come from callers; parsing one costs ~20 µs
def _spec(text: str) -> NpmSpec:
    if len(text) > MAX_RANGE_LENGTH:
        raise InvalidParams(f"version range is longer than {MAX_RANGE_LENGTH} characters")
    try:
        return NpmSpec(text)
    except ValueError as error:
        raise InvalidParams(
            f"{text!r:.80} is neither a version nor a version range (npm syntax: ^1.2,"
            f" ~1.2.3, 1.x, >=1.0.0 <2.0.0): {error}"
        ) from None


def highest_in_range(versions: Iterable[str], wanted: str) -> str | None:
    """The highest of ``versions`` that satisfies the range ``wanted``, or None."""
    spec = _spec(wanted)
    best: str | None = None
    best_parsed: Version | None = None
    for version in versions:
        parsed = Version(version)
        if spec.match(parsed) and (best_parsed is None or parsed > best_parsed):
            best, best_parsed = version, parsed
    return best


def in_range(version: str, wanted: str) -> bool:
    """Whether ``version`` satisfies the range ``wanted``; False for a string that is no
    version (one a store holds may be another writer's)."""
    try:
        parsed = Version(version)
    except ValueError:
        return False
    return bool(_spec(wanted).match(parsed))
