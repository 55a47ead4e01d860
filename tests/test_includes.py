"""``include:``: a manifest made of a folder of plugin files. Entries merge in sorted order,
relative paths resolve against the file that wrote them, every problem names its file
and line, and a reload sees a file added to the folder without losing a call."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from dispatcher import Dispatcher, ManifestError, load_manifest
from dispatcher.config import watched_paths
from dispatcher.config.includes import read_document
from tests.conftest import EXAMPLES, LOCAL_TARGET, echo_plugin

MAIN = f"""\
version: 1
include: ["plugins.d/*.yaml", "plugins.d/*.toml"]
plugins:
  - id: main
    version: 1.0.0
    target: {{provider: local, entrypoint: "echo_plugin:EchoPlugin", path: "{EXAMPLES}"}}
    methods: {{say: {{}}}}
"""


def folder(tmp_path: Path, **files: str) -> Path:
    included = tmp_path / "plugins.d"
    included.mkdir(exist_ok=True)
    for name, text in files.items():
        (included / name.replace("_", ".", 1)).write_text(text)
    path = tmp_path / "plugins.yaml"
    path.write_text(MAIN)
    return path


def entry(plugin_id: str, version: str = "1.0.0") -> str:
    return yaml.safe_dump({"plugins": [echo_plugin(plugin_id, LOCAL_TARGET, version=version)]})


def problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [problem.render(caught.value.source) for problem in caught.value.problems]


def test_a_folder_of_plugin_files_merges_in_sorted_order(tmp_path: Path) -> None:
    toml = '[[plugins]]\nid = "c"\nversion = "2.0.0"\nmethods = {say = {}}\n' + (
        f'target = {{provider = "local", entrypoint = "echo_plugin:EchoPlugin", path = "{EXAMPLES}"}}\n'
    )
    path = folder(tmp_path, b_yaml=entry("b"), a_yaml=entry("a"), c_toml=toml)
    manifest = load_manifest(path)
    assert [plugin.key for plugin in manifest.plugins] == [
        "main@1.0.0",
        "a@1.0.0",
        "b@1.0.0",
        "c@2.0.0",
    ]
    watched = {os.fspath(p) for p in watched_paths(path)}
    assert os.fspath(tmp_path / "plugins.d") in watched
    assert os.fspath(tmp_path / "plugins.d" / "a.yaml") in watched


def test_a_relative_path_resolves_against_the_included_files_folder(tmp_path: Path) -> None:
    nested = tmp_path / "plugins.d"
    nested.mkdir()
    (nested / "code").symlink_to(EXAMPLES)
    relative = {**LOCAL_TARGET, "path": "code"}
    path = folder(tmp_path, x_yaml=yaml.safe_dump({"plugins": [echo_plugin("x", relative)]}))
    plugin = load_manifest(path).plugins[1]
    assert plugin.target.path == (nested / "code").resolve()


def test_a_bad_included_file_is_named_with_its_line(tmp_path: Path) -> None:
    bad = "plugins:\n  - id: bad\n    version: one\n    methods: {say: {}}\n"
    path = folder(tmp_path, a_yaml=entry("a"), bad_yaml=bad)
    found = problems(path)
    bad_file = tmp_path / "plugins.d" / "bad.yaml"
    assert any(
        line.startswith(f"{bad_file}:3: plugins[0].version: expected a semantic version")
        for line in found
    ), found
    # a section of the whole manifest, or a further include, is refused in an included file
    path = folder(tmp_path, bad_yaml="include: [x.yaml]\negress: {}\n")
    found = problems(path)
    assert any(f"{bad_file}:1: include: includes nest one level only" in p for p in found), found
    assert any(f"{bad_file}:2: egress: an included file holds only" in p for p in found), found
    # not YAML at all
    path = folder(tmp_path, bad_yaml="plugins: [\n")
    assert any(str(bad_file) in p and "not valid YAML" in p for p in problems(path))


def test_a_duplicate_across_files_names_both(tmp_path: Path) -> None:
    path = folder(tmp_path, a_yaml=entry("same"), b_yaml=entry("same"))
    found = problems(path)
    first, second = tmp_path / "plugins.d" / "a.yaml", tmp_path / "plugins.d" / "b.yaml"
    assert any(
        p.startswith(f"{second}:")
        and f"same@1.0.0 is already declared at plugins[0] of {first}" in p
        for p in found
    ), found


def test_a_glob_matching_the_including_file_skips_it(tmp_path: Path) -> None:
    path = folder(tmp_path, a_yaml=entry("a"))
    text = path.read_text().replace('"plugins.d/*.toml"', '"*.yaml", "plugins.d/a.yaml"')
    path.write_text(text)
    assert [plugin.id for plugin in load_manifest(path).plugins] == ["main", "a"]


def test_a_missing_literal_include_and_a_bad_include_list(tmp_path: Path) -> None:
    path = tmp_path / "plugins.yaml"
    path.write_text("include: [gone.yaml]\n")
    assert any("include[0]: no file 'gone.yaml'" in p for p in problems(path))
    path.write_text("include: plugins.d\n")
    assert any("include: expected a list of file globs" in p for p in problems(path))


async def test_a_reload_sees_a_file_added_to_the_folder_with_no_failed_call(
    tmp_path: Path,
) -> None:
    path = folder(tmp_path, a_yaml=entry("a"))
    async with Dispatcher.from_file(path) as dispatcher:
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    await dispatcher.call("a", "say", {"text": "x"})
                except Exception as error:  # every failure is counted, none expected
                    failures.append(error)
                await asyncio.sleep(0)

        callers = [asyncio.create_task(load()) for _ in range(4)]
        try:
            before = [os.stat(p).st_mtime_ns for p in watched_paths(path)]
            (tmp_path / "plugins.d" / "b.yaml").write_text(entry("b", "1.1.0"))
            assert [os.stat(p).st_mtime_ns for p in watched_paths(path)] != before
            summary = await dispatcher.reload_from_file()
            assert summary["added"] == ["b@1.1.0"]
            assert (await dispatcher.call("b", "say", {"text": "y"}))["text"] == "y"
        finally:
            stop.set()
            await asyncio.gather(*callers)
        assert failures == []


@pytest.mark.parametrize(
    "text",
    [
        "plugins: [{id: a, version: 1.0.0, methods: {m: {timeout_ms: 5, pure: yes}}}]",
        "base: &base {rate: 10, burst: 2}\nlimits: [*base, {<<: *base, burst: 3}]",
        "when: 2001-12-14\nblob: !!binary aGk=\nratio: 1.5\nnothing: ~\nhex: 0x1f\nstr: !!str 12",
        "same: &s hello\nagain: *s\n'': empty key\n? long key\n: value",
        "duplicate: 1\nduplicate: 2",
        "octal: 0755\nneg: -3\nunder: 1_000\nsexa: 1:30\nbig: 12345678901234567890\nx: !!int '42'",
        "t: [true, True, on, No, off, ~, null, Null, '', 0, 7]",
    ],
)
def test_a_manifest_reads_exactly_as_pyyaml_s_safe_loader_reads_it(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    assert repr(read_document(path).data) == repr(yaml.load(text, Loader=yaml.SafeLoader))


@pytest.mark.parametrize("text", ["? [1, 2]\n: 3", "a: [1, 2\nb: 3", "a: 1\n b: 2"])
def test_bad_yaml_reads_as_pyyaml_s_safe_loader_words_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(yaml.YAMLError) as theirs:
        yaml.load(text, Loader=yaml.SafeLoader)
    with pytest.raises(ManifestError) as ours:
        read_document(path)
    assert str(getattr(theirs.value, "problem", None) or theirs.value) in str(ours.value)
