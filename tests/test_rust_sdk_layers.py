"""The Rust SDK's modules point one way, as `lint-imports` holds the Python packages to
their layers: the lists "from the top down" in the docs of ``sdk/rust/src/lib.rs`` (the
crate) and ``sdk/rust/src/websocket/mod.rs`` (its parts) are checked against what each
module names, and no two modules may name each other, however far round.

What a module names is read from its source, without a Rust toolchain: every path that
starts with ``crate::``, ``super::``, ``self::`` or the name of one of its own child
modules, outside comments, string and character literals and its ``#[cfg(test)] mod
tests`` (a test may reach anywhere), resolved to the deepest module it names and through
the ``pub use`` re-exports (``crate::Json`` is ``json``'s). ``pb``, the generated code the
crate root includes, counts as a module of its own; the crate root's own types
(``Plugin``, ``Call``) as the module ``crate``.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOURCES = ROOT / "sdk" / "rust" / "src"
CRATE = "crate"
#: The module `tonic::include_proto!` writes into the crate root.
GENERATED = "pb"


def module_of(path: Path) -> str:
    parts = list(path.relative_to(SOURCES).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return CRATE if parts == ["lib"] else "::".join(parts)


def parent_of(module: str) -> str:
    return module.rsplit("::", 1)[0] if "::" in module else CRATE


def child(module: str, name: str) -> str:
    return name if module == CRATE else f"{module}::{name}"


def code_of(text: str) -> str:
    """`text` without comments, string and character literals, and its tests module."""
    kept: list[str] = []
    at = 0
    while at < len(text):
        rest = text[at:]
        after_word = at > 0 and (text[at - 1].isalnum() or text[at - 1] == "_")
        if rest.startswith("//"):
            end = text.find("\n", at)
            at = len(text) if end < 0 else end
        elif rest.startswith("/*"):
            at = text.index("*/", at + 2) + 2
        elif not after_word and (raw := re.match(r'b?r(#*)"', rest)):
            closing = '"' + raw.group(1)
            at = text.index(closing, at + raw.end()) + len(closing)
            kept.append('""')
        elif not after_word and (string := re.match(r'b?"', rest)):
            at += string.end()
            while text[at] != '"':
                at += 2 if text[at] == "\\" else 1
            at += 1
            kept.append('""')
        elif (char := re.match(r"b?'(\\.[^']*|[^\\'])'", rest)) and (
            rest[0] == "'" or not after_word
        ):
            at += char.end()
            kept.append("' '")
        else:
            kept.append(text[at])
            at += 1
    code = "".join(kept)
    tests = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod tests\b", code)
    return code[: tests.start()] if tests else code


def use_paths(tree: str) -> list[str]:
    """The paths of one `use` tree: `a::{b, c::{d}}` is `a::b` and `a::c::d`."""
    tree = re.sub(r"\s+", " ", tree).strip()
    grouped = re.fullmatch(r"(.*?) ?:: ?\{(.*)\}", tree)
    if not grouped:
        return [re.sub(r" as \w+$", "", tree).replace(" ", "")]
    prefix, inner = grouped.groups()
    parts, depth, current = [], 0, ""
    for c in inner:
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (c == "{") - (c == "}")
        current += c
    parts.append(current)
    return [path for part in parts if part for path in use_paths(f"{prefix}::{part}")]


@cache
def sources() -> dict[str, str]:
    return {module_of(path): code_of(path.read_text()) for path in SOURCES.rglob("*.rs")}


def modules() -> set[str]:
    return set(sources()) | {GENERATED}


def absolute(module: str, segments: list[str]) -> list[str] | None:
    """`segments` (a path written in `module`) from the crate root, or None for another
    crate's path."""
    head, rest = segments[0], segments[1:]
    if head == CRATE:
        return [CRATE, *rest]
    if head == "super":
        return [parent_of(module), *rest]
    if head == "self":
        return [module, *rest]
    if child(module, head) in modules():
        return [module, *segments]
    return None


@cache
def reexports() -> dict[tuple[str, str], str]:
    """(module, name) -> the module that defines what `module` re-exports as `name`."""
    found: dict[tuple[str, str], str] = {}
    for _ in range(3):  # a re-export of a re-export
        for module, code in sources().items():
            for tree in re.findall(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code):
                for path in use_paths(tree):
                    segments = [s for s in path.split("::") if s]
                    full = absolute(module, segments)
                    if full and segments[-1] != "self":
                        found[(module, segments[-1])] = resolve(full, found)
    return found


def resolve(path: list[str], exported: dict[tuple[str, str], str] | None = None) -> str:
    """The deepest module `path` (from the crate root or a module) names."""
    exported = reexports() if exported is None else exported
    module = path[0]
    for name in path[1:]:
        if child(module, name) in modules():
            module = child(module, name)
        elif (module, name) in exported:
            return exported[(module, name)]
        else:
            break
    return module


@cache
def uses() -> dict[str, set[str]]:
    """The modules each module names (besides itself)."""
    graph: dict[str, set[str]] = {}
    for module, code in sources().items():
        paths = [p for tree in re.findall(r"\buse\s+([^;]+);", code) for p in use_paths(tree)]
        paths += re.findall(r"\b(?:crate|super|self)(?:::\w+)+", code)
        paths += [
            f"self::{name}"
            for name in re.findall(r"(?<![:\w])(\w+)::[\w{]", code)
            if child(module, name) in modules()
        ]
        named = set()
        for path in paths:
            full = absolute(module, [s for s in path.split("::") if s])
            if full:
                named.add(resolve(full))
        graph[module] = named - {module}
    return graph


def layers(path: Path, module: str) -> dict[str, int]:
    """The line of each module in the numbered list "from the top down" of `path`'s docs;
    modules on one line are separated by ` | `, the module itself is "this file"."""
    docs = "\n".join(
        line.removeprefix("//!").strip()
        for line in path.read_text().splitlines()
        if line.startswith("//!")
    )
    listed = re.findall(r"^\d+\.\s(.*?)(?=^\d+\.\s|\n\n|\Z)", docs, re.M | re.S)
    assert listed, f"{path.name} lists no layers"
    line_of: dict[str, int] = {}
    for line, item in enumerate(listed):
        for entry in re.sub(r"\s+", " ", item).split(" | "):
            name = re.match(r"`(\w+)`", entry)
            if name:
                line_of[child(module, name.group(1))] = line
            elif entry.lower().startswith("this file"):
                line_of[module] = line
    return line_of


def crate_layers() -> dict[str, int]:
    return layers(SOURCES / "lib.rs", CRATE)


def websocket_layers() -> dict[str, int]:
    return layers(SOURCES / "websocket" / "mod.rs", "websocket")


def top(module: str) -> str:
    return module.split("::")[0]


def test_every_module_has_its_line() -> None:
    crate, websocket = crate_layers(), websocket_layers()
    unlisted = [
        module
        for module in sorted(modules())
        if (websocket.get(module) if top(module) == "websocket" else crate.get(top(module))) is None
    ]
    assert unlisted == [], "modules missing from the layers of lib.rs or websocket/mod.rs"


def test_a_module_uses_only_modules_below_its_line() -> None:
    crate, websocket = crate_layers(), websocket_layers()
    wrong = []
    for module, named in sorted(uses().items()):
        for other in sorted(named):
            if top(module) == top(other) == "websocket":
                above, below = websocket[module], websocket[other]
            elif top(module) == top(other):
                continue  # inside `registry`: no circle there is checked below
            else:
                above, below = crate[top(module)], crate[top(other)]
            if above >= below:
                wrong.append(f"{module} (line {above + 1}) uses {other} (line {below + 1})")
    assert wrong == [], "\n".join(wrong)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_two_modules_use_each_other() -> None:
    assert circles(uses()) == [], "modules that use each other, directly or round others"


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_a_circle_is_found_however_far_round(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert circles(graph) == expected


def test_what_a_module_names_is_read_past_comments_strings_and_groups() -> None:
    code = code_of(
        'use crate::{a::{B, c}, d as e};\nlet url = "ws://x"; // crate::f\n'
        "let q = '\"'; crate::g::h();\n#[cfg(test)]\nmod tests { use crate::i; }\n"
    )
    assert "crate::f" not in code and "crate::i" not in code and "crate::g::h" in code
    assert use_paths("crate::{a::{B, c}, d as e}") == ["crate::a::B", "crate::a::c", "crate::d"]
