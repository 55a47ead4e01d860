"""What a manifest problem may quote of the value it refused.

A problem names the field and, to help, the value it got: but never a value that may be
a secret. ``shown_input`` decides by the value (a number, a boolean, a plain text; no
list or map, no text holding ``@`` unless it is a URL whose credentials it masks), and
``is_secret`` by the field, following pydantic's error location through the manifest's
types (``SecretStr``, a model's ``secret_fields``, ``repr=False``, or anything inside one).
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretBytes, SecretStr, Tag

from providers.target import MASK, masked_url

__all__ = ["is_secret", "shown_input"]


def shown_input(value: Any) -> str | None:
    """What a problem may quote of the input it refused: a number, a boolean, a text;
    a URL with its credentials masked, never a text holding ``@`` otherwise (a user and
    password that did not parse as such: ``u:pw@h``, ``http://u:p/w@h``)."""
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    if not isinstance(value, str):
        return f"{value!r:.80}" if value is None or isinstance(value, bool | int | float) else None
    if "@" in value:
        try:
            value = masked_url(value)
        except ValueError:  # not a URL urlsplit takes (a bad IPv6 literal, say)
            return None
        if value.count("@") != 1 or not value.partition("@")[0].endswith(MASK):
            return None
    return f"{value!r:.80}"


#: Types whose values never print, nor are quoted by a problem.
_SECRET_TYPES = (SecretStr, SecretBytes)


def is_secret(model: type[BaseModel], location: tuple[str | int, ...]) -> bool:
    """Whether the problem at pydantic's ``location`` (union tags included) is in a value
    that never prints: a ``SecretStr``, a field of a model's ``secret_fields`` or one
    declared ``repr=False``, or anything inside one. Unknown shapes count as not secret:
    the other rules (no map, no list, no URL credentials) still apply."""
    candidates: list[Any] = [model]
    for part in location:
        following: list[Any] = []
        members = _members(candidates)
        tagged = [m for m in members if _tag_of(m) == part] if len(members) > 1 else []
        if tagged:
            candidates = [_plain(member) for member in tagged]
            continue
        for kind in map(_plain, members):
            if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(part, str):
                field = kind.model_fields.get(part)
                if field is None:
                    continue
                if part in getattr(kind, "secret_fields", ()) or field.repr is False:
                    return True
                following.append(field.annotation)
            elif getattr(kind, "__origin__", None) in (list, tuple, set, frozenset):
                following.extend(getattr(kind, "__args__", ()))
            elif getattr(kind, "__origin__", None) is dict:
                following.extend(getattr(kind, "__args__", ())[1:])
        if following:
            candidates = following
        # else: a tag pydantic adds (``function-after[…]``), or a shape not followed
    return any(
        isinstance(kind, type) and issubclass(kind, _SECRET_TYPES)
        for kind in map(_plain, _members(candidates))
    )


def _members(kinds: list[Any]) -> list[Any]:
    """``kinds`` with every union spread into its members (each kept ``Annotated``)."""
    spread: list[Any] = []
    for kind in kinds:
        inner = get_args(kind)[0] if get_origin(kind) is Annotated else kind
        if get_origin(inner) in (Union, UnionType):
            spread.extend(_members(list(get_args(inner))))
        else:
            spread.append(kind)
    return spread


def _plain(kind: Any) -> Any:
    while get_origin(kind) is Annotated:
        kind = get_args(kind)[0]
    return kind


def _tag_of(member: Any) -> Any:
    """The tag pydantic puts in a location for this member of a discriminated union:
    its ``Tag``, or the one value of a ``Literal`` field (``provider: Literal["http"]``)."""
    if get_origin(member) is Annotated:
        tags = [item.tag for item in member.__metadata__ if isinstance(item, Tag)]
        if tags:
            return tags[0]
    kind = _plain(member)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        for field in kind.model_fields.values():
            values = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
            if len(values) == 1 and field.is_required():
                return values[0]
    return None
