"""``AccessControl``: may this principal call ``plugin@version.method``? Else ``Forbidden``.

Rules are ``plugin[@version-glob].method`` patterns with fnmatch globs (``*`` matches any
characters, dots included; ``?``; ``[…]``), written per role (``access.roles``):

* a rule without ``@`` is matched against ``plugin.method``, one with it against
  ``plugin@version.method``, so ``echo@1.*.say`` allows ``say`` of echo 1.x only;
* matching is case-sensitive on the exact names as the call gives them: nothing is
  normalised, folded or trimmed first, so a look-alike (``Echo``, ``echo ``, a Cyrillic
  ``e`` (U+0435), ``echo/../admin``, a NUL) is simply another name — and a name that is not a
  manifest identifier (ASCII letter first; letters, digits, ``_ . -``) is refused before
  any rule is read, so no glob can ever let one through;
* a principal may call what any of its roles allows and none of its roles denies (deny
  beats allow, across roles too); what no rule allows is refused (default deny).

Globs are compiled once into one regular expression per role and list. Decisions are
cached per (roles, plugin, version, method), bounded: the hot path is one dict probe.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from dispatcher.config.security import AccessConfig, RoleRules
from dispatcher.identity import Principal
from linchkit_plugin.errors import Forbidden

__all__ = ["AccessControl"]

#: What a plugin id, a method name and a version may look like at all (the manifest's own
#: IDENTIFIER, and semantic versions); ASCII only, by construction of the classes.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_VERSION = re.compile(r"[0-9A-Za-z.+-]*")
_MAX_NAME = 256
#: Decisions kept; past this the cache starts over (its keys are names a caller chose).
DECISION_CACHE_SIZE = 8192

Key = tuple[frozenset[str], str, str, str]


class _Role:
    __slots__ = ("allow", "deny")

    def __init__(self, rules: RoleRules) -> None:
        self.allow = _compiled(rules.allow)
        self.deny = _compiled(rules.deny)


def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """(rules without a version, rules with one), each as one alternation, or None."""
    plain = [fnmatch.translate(p) for p in patterns if "@" not in p]
    versioned = [fnmatch.translate(p) for p in patterns if "@" in p]
    # fnmatch.translate anchors each pattern at the end (\\Z) and re.match at the start;
    # no IGNORECASE: matching is case-sensitive whatever the platform.
    return (
        re.compile("|".join(f"(?:{p})" for p in plain)) if plain else None,
        re.compile("|".join(f"(?:{p})" for p in versioned)) if versioned else None,
    )


def _matches(
    compiled: tuple[re.Pattern[str] | None, re.Pattern[str] | None], plain: str, versioned: str
) -> bool:
    without, with_version = compiled
    return bool(
        (without is not None and without.match(plain))
        or (with_version is not None and with_version.match(versioned))
    )


class AccessControl:
    """The manifest's ``access`` section, compiled."""

    __slots__ = ("_decisions", "_roles", "checks", "refusals")

    def __init__(self, config: AccessConfig) -> None:
        self._roles: Mapping[str, _Role] = {
            name: _Role(rules) for name, rules in config.roles.items()
        }
        self._decisions: dict[Key, bool] = {}
        self.checks = 0
        self.refusals = 0

    def allows(self, principal: Principal, plugin: str, version: str, method: str) -> bool:
        """Whether ``principal`` may call ``method`` of ``plugin`` at ``version``."""
        key = (principal.roles, plugin, version, method)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(principal.roles, plugin, version, method)
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def check(self, principal: Principal, plugin: str, version: str, method: str) -> None:
        """Return if ``principal`` may call it; raise ``Forbidden`` otherwise."""
        self.checks += 1
        if not self.allows(principal, plugin, version, method):
            self.refusals += 1
            raise Forbidden(
                f"{principal.id!r} may not call {plugin!r:.80}.{method!r:.80}: no role of"
                " theirs allows it (access.roles in the manifest)",
                details={"principal": principal.id},
            )

    def _decide(self, roles: frozenset[str], plugin: str, version: str, method: str) -> bool:
        if not _valid(plugin, method, version):
            return False
        plain = f"{plugin}.{method}"
        versioned = f"{plugin}@{version}.{method}"
        allowed = False
        for name in roles:
            role = self._roles.get(name)
            if role is None:
                continue
            if _matches(role.deny, plain, versioned):
                return False  # deny beats allow, whichever role says it
            allowed = allowed or _matches(role.allow, plain, versioned)
        return allowed

    def stats(self) -> dict[str, int]:
        return {"checks": self.checks, "refusals": self.refusals, "cached": len(self._decisions)}

    def __repr__(self) -> str:
        return (
            f"<AccessControl roles={sorted(self._roles)} checks={self.checks}"
            f" refusals={self.refusals} cached={len(self._decisions)}>"
        )


def _valid(plugin: str, method: str, version: str) -> bool:
    return (
        len(plugin) <= _MAX_NAME
        and len(method) <= _MAX_NAME
        and len(version) <= _MAX_NAME
        and _NAME.fullmatch(plugin) is not None
        and _NAME.fullmatch(method) is not None
        and _VERSION.fullmatch(version) is not None
    )
