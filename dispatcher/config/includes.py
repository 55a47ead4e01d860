"""``include:``: a manifest made of several files, each read as its own ``Document``.

A manifest's top-level ``include`` lists globs relative to its folder (YAML or TOML files,
matched in sorted order). An included file holds only ``plugins`` and ``rollouts``; it
may not include further (one level, so there is no cycle to detect). Each document keeps
its own folder, so relative paths inside it resolve against the file that wrote them,
and its own YAML tree, so a problem in it names that file and line.
"""

from __future__ import annotations

import glob
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dispatcher.config.errors import ManifestError, ManifestProblem
from dispatcher.config.files import read_capped
from dispatcher.config.shape import MAX_DEPTH, MAX_FILE_BYTES, TOO_DEEP, shape_problem

__all__ = [
    "INCLUDED_KEYS",
    "Document",
    "expand_includes",
    "parse_yaml",
    "read_document",
    "watched_paths",
]

#: What an included file may hold: its entries, never sections of the whole manifest.
INCLUDED_KEYS = frozenset({"plugins", "rollouts"})

_GLOB_MAGIC = frozenset("*?[")

#: How long a manifest handed over through a pipe (``<(envsubst < plugins.yaml)``, a FIFO)
#: may take to arrive whole: a FIFO nobody writes to fails in this time instead of hanging.
PIPE_WAIT_SECONDS = 10.0


#: libyaml's parser when PyYAML was built with it: the YAML of 1,000 plugins parsed in
#: 0.2 s with it against 2.3 s without (bench/bench_startup.py); the same documents.
_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR, _MAP, _SEQ, _INT, _BOOL, _NULL = (
    f"tag:yaml.org,2002:{name}" for name in ("str", "map", "seq", "int", "bool", "null")
)
_MERGE = "tag:yaml.org,2002:merge"


class _NotPlain(Exception):
    """A document the fast constructor leaves to PyYAML's own (see ``_Loader``)."""


def _keys_as_written(node: yaml.Node) -> None:
    """A mapping's keys that YAML 1.1 reads as booleans stay the words they are.

    PyYAML follows YAML 1.1, where a plain ``on``, ``off``, ``yes`` or ``no`` is a boolean,
    key or not: a fallback's ``on: [target_unavailable]`` became ``{True: [...]}`` and was
    refused as "on: required key is missing". Every key of a manifest is a name, and a
    boolean key cannot even be sent as JSON (a plugin's ``config``), so a key keeps its
    text; values are read as before (``enabled: yes`` is still true).
    """
    for key_node, _ in node.value:
        if key_node.tag == _BOOL and isinstance(key_node, yaml.ScalarNode) and not key_node.style:
            key_node.tag = _STR


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (its own wording of problems), keys as in ``_keys_as_written``."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        self.flatten_mapping(node)  # merged keys too (a second flatten finds nothing)
        _keys_as_written(node)
        return super().construct_mapping(node, deep=deep)


class _Loader(_BASE_LOADER):  # type: ignore[misc]
    """PyYAML's safe loader, building plain documents (maps, lists, strings) directly;
    keys as in ``_keys_as_written``.

    PyYAML's constructor is Python even over libyaml: a generator per mapping, a dispatch
    per node, and an implicit-tag lookup (regular expressions) per scalar, most of them
    the same few keys. Here tags are remembered per distinct scalar, and maps, lists and
    strings are built in one walk; every other tag (numbers, booleans, timestamps, …)
    still goes through PyYAML's constructor. A document with merge keys, unhashable keys
    or an alias to a node that contains it is built by PyYAML's constructor alone. The
    YAML of 1,000 plugins went from ~210 ms to ~110 ms (bench/bench_startup.py).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._tags: dict[tuple[str, Any], str] = {}
        bools = self.bool_values
        self._plain_scalars: dict[str, Callable[[str], Any]] = {
            _STR: str,
            _NULL: lambda _: None,
            _BOOL: lambda text: bools[text.lower()],  # what construct_yaml_bool does
            # Plain decimal integers only; signs, 0x/0o/0b, underscores, "1:30" and a
            # leading zero (octal in YAML 1.1) go through PyYAML below.
            _INT: lambda text: int(text) if text.isdigit() and text[0] != "0" else self._int(text),
        }
        #: Whether the document needs ``shape_problem``'s walk: an alias was met (a shared
        #: node, which may expand it), or PyYAML's constructor built it (unwatched). Else
        #: ``_build`` kept the depth within ``MAX_DEPTH`` itself, for a len() per map or list.
        self.unchecked = False

    def _int(self, text: str) -> Any:
        return self.construct_yaml_int(yaml.ScalarNode(_INT, text))

    # A safe loader has no path resolvers: nothing to track per node on the way down and up
    # (libyaml's composer calls both for every node), and a scalar's tag depends on its
    # text alone.
    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        pass

    def ascend_resolver(self) -> None:
        pass

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is not yaml.ScalarNode:
            return super().resolve(kind, value, implicit)  # type: ignore[no-any-return]
        key = (value, implicit)
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = super().resolve(kind, value, implicit)
        return tag

    def construct_document(self, node: yaml.Node) -> Any:
        try:
            return self._build(node, {}, set())
        except _NotPlain:
            self.unchecked = True
            return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        self.flatten_mapping(node)
        _keys_as_written(node)
        return super().construct_mapping(node, deep=deep)

    def _build(self, node: yaml.Node, built: dict[int, Any], open_nodes: set[int]) -> Any:
        identity = id(node)
        if identity in built:  # an alias of a node built already: the same object
            self.unchecked = True
            return built[identity]
        tag = node.tag
        kind = type(node)
        if kind is yaml.ScalarNode and tag in self._plain_scalars:
            value: Any = self._plain_scalars[tag](node.value)
        elif (tag == _MAP and kind is yaml.MappingNode) or (
            tag == _SEQ and kind is yaml.SequenceNode
        ):
            if identity in open_nodes:
                raise _NotPlain  # it contains itself
            if len(open_nodes) >= MAX_DEPTH:
                raise _NotPlain  # too deep: PyYAML's constructor, then shape_problem, say so
            open_nodes.add(identity)
            value = (
                self._mapping(node, built, open_nodes)
                if tag == _MAP
                else [self._build(item, built, open_nodes) for item in node.value]
            )
            open_nodes.discard(identity)
        else:
            value = self.construct_object(node, deep=True)
        built[identity] = value
        return value

    def _mapping(self, node: yaml.Node, built: dict[int, Any], open_nodes: set[int]) -> Any:
        _keys_as_written(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                raise _NotPlain
            key = self._build(key_node, built, open_nodes)
            try:
                hash(key)
            except TypeError:
                raise _NotPlain from None  # PyYAML's constructor says what is wrong
            mapping[key] = self._build(value_node, built, open_nodes)
        return mapping


@dataclass(frozen=True, slots=True)
class Document:
    """One parsed file of a manifest: what it says, where it lies, its YAML text.

    The YAML tree, which only locates problems (file and line), is built by ``tree`` when
    a problem is reported, not for every manifest that loads cleanly.
    """

    source: str
    data: Any
    base_dir: Path
    yaml_root: yaml.Node | None = None
    yaml_text: str | None = None

    def tree(self) -> yaml.Node | None:
        """The document's YAML tree (given, or composed from its text now), if it is YAML."""
        if self.yaml_root is not None or self.yaml_text is None:
            return self.yaml_root
        try:
            return yaml.compose(self.yaml_text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:  # parsed once already; cannot fail the second time
            return None


def read_document(path: str | os.PathLike[str], *, pipes: bool = True) -> Document:
    """Read and parse one file (``.toml`` as TOML, anything else as YAML), refused if it
    nests too deep or its aliases expand it too far (``dispatcher.config.shape``). A pipe
    is read for ``PIPE_WAIT_SECONDS`` at most, or refused without ``pipes``
    (``dispatcher.config.files``)."""
    file = Path(path)
    source = os.fspath(path)
    try:
        raw = read_capped(file, MAX_FILE_BYTES, pipe_wait=PIPE_WAIT_SECONDS if pipes else None)
    except OSError as error:
        raise ManifestError(
            source, [ManifestProblem("", f"cannot read: {error.strerror}")]
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        too_large = f"larger than {MAX_FILE_BYTES >> 20} MiB: not a manifest"
        raise ManifestError(source, [ManifestProblem("", too_large)])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        not_text = f"not UTF-8 text: byte {raw[error.start]:#04x} at offset {error.start}"
        raise ManifestError(source, [ManifestProblem("", not_text, line)]) from None
    toml = file.suffix == ".toml"
    try:
        data, unchecked = (_parsed_toml(source, text), True) if toml else _parsed_yaml(source, text)
    except RecursionError:  # the parsers recurse per level: this is far past MAX_DEPTH
        problem: str | None = TOO_DEEP
    else:
        problem = shape_problem(data) if unchecked else None
    if problem is not None:
        raise ManifestError(source, [ManifestProblem("", problem)])
    return Document(source, data, file.parent, yaml_text=None if toml else text)


def _parsed_toml(source: str, text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(source, [ManifestProblem("", f"not valid TOML: {error}")]) from None


def _parsed_yaml(source: str, text: str) -> tuple[Any, bool]:
    """The document, and whether it still needs ``shape_problem`` (``_Loader.unchecked``)."""
    try:
        return _loaded(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError(
            source, [ManifestProblem("", f"not valid YAML: {problem}", line)]
        ) from None


def parse_yaml(text: str) -> Any:
    """A manifest's YAML: safe, with its keys as written (``_keys_as_written``)."""
    return _loaded(text)[0]


def _loaded(text: str) -> tuple[Any, bool]:
    """``parse_yaml``, and whether the document still needs ``shape_problem``."""
    loader = _Loader(text)
    try:
        return loader.get_single_data(), loader.unchecked
    except yaml.YAMLError:
        # libyaml words its problems its own way: report them as PyYAML's parser does.
        return yaml.load(text, Loader=_SafeLoader), True
    finally:
        loader.dispose()


def expand_includes(main: Document) -> tuple[Document, list[Document], list[ManifestProblem]]:
    """``main`` without its ``include`` key, the documents it includes, and every problem
    met reading them (each problem carries the file it is in)."""
    if not isinstance(main.data, dict) or "include" not in main.data:
        return main, [], []
    patterns = main.data["include"]
    rest = {key: value for key, value in main.data.items() if key != "include"}
    main = Document(main.source, rest, main.base_dir, main.yaml_root, main.yaml_text)
    if not isinstance(patterns, list) or not all(
        isinstance(pattern, str) and pattern for pattern in patterns
    ):
        return main, [], [ManifestProblem("include", "expected a list of file globs")]
    documents: list[Document] = []
    problems: list[ManifestProblem] = []
    # A glob matching the including file itself (``*.yaml`` beside it) skips it, and two
    # globs matching one file include it once.
    seen = {(main.base_dir / Path(main.source).name).resolve()}
    for index, pattern in enumerate(patterns):
        for path in _matches(main.base_dir, pattern):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            try:
                # Files only: an included file is read again on every reload, which a
                # pipe cannot be.
                document = read_document(path, pipes=False)
            except ManifestError as error:
                problems.extend(_in(error.source, problem) for problem in error.problems)
                continue
            problems.extend(_shape_problems(document, f"include[{index}]"))
            documents.append(document)
        if not _has_magic(pattern) and not (main.base_dir / pattern).exists():
            problems.append(ManifestProblem(f"include[{index}]", f"no file {pattern!r}"))
    return main, documents, problems


def watched_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The files and folders whose change may change the manifest at ``path``: itself,
    every file it includes and the folder each glob looks in (a file added there)."""
    file = Path(path)
    paths = [file]
    try:
        data = read_document(file, pipes=False).data  # a pipe's bytes were the load's
    except ManifestError:
        return paths  # unreadable now: the next change to it will be seen anyway
    patterns = data.get("include") if isinstance(data, dict) else None
    if not isinstance(patterns, list):
        return paths
    for pattern in patterns:
        if isinstance(pattern, str) and pattern:
            paths.append(_folder_of(file.parent, pattern))
            paths.extend(_matches(file.parent, pattern))
    return paths


def _matches(base_dir: Path, pattern: str) -> list[Path]:
    return [Path(name) for name in sorted(glob.glob(os.path.join(base_dir, pattern)))]


def _has_magic(pattern: str) -> bool:
    return any(character in _GLOB_MAGIC for character in pattern)


def _folder_of(base_dir: Path, pattern: str) -> Path:
    """The deepest folder a glob names before its first wildcard."""
    folder = base_dir
    for part in Path(pattern).parent.parts:
        if _has_magic(part):
            break
        folder = folder / part
    return folder


def _shape_problems(document: Document, where: str) -> list[ManifestProblem]:
    data = document.data
    if data is None:
        return []  # an empty file includes nothing
    if not isinstance(data, dict):
        return [_in(document.source, ManifestProblem("", "expected a mapping with 'plugins'"))]
    problems = []
    for key in data:
        if key == "include":
            message = (
                "includes nest one level only: list this file's includes in the manifest"
                f" that includes it ({where})"
            )
        elif key not in INCLUDED_KEYS:
            message = (
                f"an included file holds only 'plugins' and 'rollouts', not {key!r};"
                " set it in the including manifest"
            )
        else:
            continue
        problems.append(_in(document.source, ManifestProblem(str(key), message)))
    return problems


def _in(source: str, problem: ManifestProblem) -> ManifestProblem:
    return ManifestProblem(problem.path, problem.message, problem.line, source)
