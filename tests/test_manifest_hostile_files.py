"""Manifest files made to hurt the reader: nested past any parser's stack, YAML aliases
that expand a few hundred bytes to billions of values, bytes that are not UTF-8, a path
that never ends. Each is
a typed ``ManifestError`` naming the file, at once, from ``load_manifest``, an included
file, a reload and the CLI alike; a manifest that merely shares blocks by alias loads.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dispatcher import Dispatcher, ManifestError, load_manifest
from dispatcher.config import includes
from dispatcher.config.shape import MAX_ALIASED_VALUES, MAX_DEPTH, MAX_FILE_BYTES
from tests.conftest import EXAMPLES, ROOT

pytestmark = pytest.mark.timeout(120)  # before the bounds, some of these ran for hours

TARGET = f'{{provider: local, entrypoint: "echo_plugin:EchoPlugin", path: "{EXAMPLES}"}}'
PLUGIN = f"""\
version: 1
plugins:
  - id: echo
    version: 1.0.0
    target: {TARGET}
    methods: {{say: {{}}}}
"""


def with_config(config: str) -> str:
    """The plugin above with ``config: CONFIG`` (YAML, on one line or indented below)."""
    return PLUGIN + f"    config: {config}\n"


def nested_flow(levels: int) -> str:
    """A config (a map: one level) holding lists nested to ``levels`` in all."""
    return "{deep: " + "[" * (levels - 1) + "]" * (levels - 1) + "}"


def nested_block(levels: int) -> str:
    """A config of ``levels`` maps inside each other, written as indented blocks."""
    lines = [" " * (6 + 2 * level) + "k:" for level in range(levels - 1)]
    return "\n" + "\n".join(lines) + "\n" + " " * (6 + 2 * (levels - 1)) + "k: 1"


def laughs(depth: int, merge: bool = False) -> str:
    """Anchors that each repeat the one before nine times: 9**depth values once expanded,
    in a few hundred bytes (as lists, or as maps merged with ``<<``)."""
    if merge:
        lines = ["      a0: &a0 {x0: lol, x1: lol, x2: lol}"]
        for level in range(1, depth):
            merged = ", ".join(f"m{i}: *a{level - 1}" for i in range(9))
            lines.append(f"      a{level}: &a{level} {{{merged}}}")
    else:
        lines = ["      a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        for level in range(1, depth):
            lines.append(f"      a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n" + "\n".join(lines)


def problem(path: Path) -> str:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.source == str(path)
    [only] = caught.value.problems
    return only.render(caught.value.source)


def write(folder: Path, text: str | bytes, name: str = "plugins.yaml") -> Path:
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# -- depth --------------------------------------------------------------------------------


@pytest.mark.parametrize("written", ["flow", "block"])
def test_a_document_as_deep_as_the_bound_loads_and_one_level_more_is_refused(
    tmp_path: Path, written: str
) -> None:
    # The plugin's config sits three levels down (root, plugins, the plugin).
    def config(levels: int) -> str:
        return nested_flow(levels) if written == "flow" else nested_block(levels)

    deepest = MAX_DEPTH - 3
    manifest = load_manifest(write(tmp_path, with_config(config(deepest))))
    assert manifest.plugins[0].config is not None
    refused = problem(write(tmp_path, with_config(config(deepest + 1))))
    assert f"nested deeper than {MAX_DEPTH} levels" in refused, refused


@pytest.mark.parametrize("levels", [MAX_DEPTH + 10, 400, 5_000, 100_000])
def test_yaml_nested_past_the_parser_s_stack_is_refused_not_a_recursion_error(
    tmp_path: Path, levels: int
) -> None:
    refused = problem(write(tmp_path, with_config(nested_flow(levels))))
    assert f"nested deeper than {MAX_DEPTH} levels" in refused, refused


@pytest.mark.parametrize("levels", [MAX_DEPTH + 10, 5_000])
def test_toml_nested_past_the_parser_s_stack_is_refused_not_a_recursion_error(
    tmp_path: Path, levels: int
) -> None:
    toml = (
        'version = 1\n[[plugins]]\nid = "echo"\nversion = "1.0.0"\n'
        f"config = {{deep = {'[' * levels}{']' * levels}}}\n"
        '[plugins.target]\nprovider = "local"\n'
        f'entrypoint = "echo_plugin:EchoPlugin"\npath = "{EXAMPLES}"\n'
        "[plugins.methods.say]\n"
    )
    refused = problem(write(tmp_path, toml, "plugins.toml"))
    assert f"nested deeper than {MAX_DEPTH} levels" in refused, refused


# -- aliases ------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", [False, True], ids=["lists", "merged maps"])
@pytest.mark.parametrize("depth", [7, 9, 12])
def test_aliases_that_expand_past_the_bound_are_refused_at_once(
    tmp_path: Path, depth: int, merge: bool
) -> None:
    # 9**7 is 4.8 million values; 9**12, 282 billion: a load that did not end.
    refused = problem(write(tmp_path, with_config(laughs(depth, merge))))
    assert f"aliases (*name) add over {MAX_ALIASED_VALUES:,} values" in refused, refused


@pytest.mark.parametrize("config", ["&loop {again: *loop}", "{list: &loop [1, *loop]}"])
def test_a_node_that_contains_itself_is_refused(tmp_path: Path, config: str) -> None:
    # It loaded as a cyclic object, and the substitution of ${VAR} that walks it next
    # raised RecursionError.
    refused = problem(write(tmp_path, with_config(config)))
    assert "an alias inside the node it names" in refused, refused


def test_aliases_within_the_bound_load_and_share_what_they_name(tmp_path: Path) -> None:
    # 9**6 (531,441) values: expensive, and still a file someone may write.
    manifest = load_manifest(write(tmp_path, with_config(laughs(6))))
    config = manifest.plugins[0].config
    assert isinstance(config, dict)
    assert config["a5"][8][8][8][8][8] == ["lol"] * 9


def test_many_plugins_sharing_a_block_by_alias_load(tmp_path: Path) -> None:
    # The usual use of aliases: one policy block for every method of many plugins.
    plugins = "".join(
        f"""
  - id: p{index}
    version: 1.0.0
    target: {TARGET}
    methods: {{say: *policies, shout: *policies}}"""
        for index in range(1, 500)
    )
    text = f"""\
version: 1
plugins:
  - id: p0
    version: 1.0.0
    target: {TARGET}
    methods:
      say: &policies
        timeout_ms: 900
        idempotent: true
        retry: {{attempts: 3, max_backoff_ms: 50}}
        rate_limit: {{rate: 100, burst: 10}}{plugins}
"""
    manifest = load_manifest(write(tmp_path, text))
    assert len(manifest.plugins) == 500
    assert {spec.methods["shout"].timeout_ms for spec in manifest.plugins[1:]} == {900}


def test_an_included_file_is_held_to_the_same_bounds_and_named(tmp_path: Path) -> None:
    (tmp_path / "plugins.d").mkdir()
    write(tmp_path / "plugins.d", "plugins:\n  - id: bomb\n    config:" + laughs(10), "bomb.yaml")
    main = write(tmp_path, "version: 1\ninclude: [plugins.d/*.yaml]\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(main)
    rendered = [found.render(caught.value.source) for found in caught.value.problems]
    assert any("bomb.yaml" in line and "aliases (*name)" in line for line in rendered), rendered


# -- bytes --------------------------------------------------------------------------------


def test_a_path_that_never_ends_or_a_file_past_the_bound_is_refused_unread(tmp_path: Path) -> None:
    # /dev/zero was read whole into memory: the process grew until the kernel ended it.
    with pytest.raises(ManifestError, match="larger than 64 MiB"):
        load_manifest("/dev/zero")
    main = write(tmp_path, "version: 1\ninclude: [/dev/zero]\n")
    with pytest.raises(ManifestError, match=r"/dev/zero.*not a regular file"):
        load_manifest(main)
    huge = write(tmp_path, PLUGIN + "#" * MAX_FILE_BYTES + "\n", "huge.yaml")
    assert "larger than 64 MiB" in problem(huge)


def test_a_manifest_read_from_a_pipe_still_loads(tmp_path: Path) -> None:
    # As from `-m <(envsubst < plugins.tmpl.yaml)`: only the size is bounded.
    fifo = tmp_path / "plugins.yaml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(PLUGIN,))
    writer.start()
    try:
        assert [spec.id for spec in load_manifest(fifo).plugins] == ["echo"]
    finally:
        writer.join(timeout=10)


def test_a_pipe_whose_writer_comes_late_still_loads(tmp_path: Path) -> None:
    fifo = tmp_path / "plugins.yaml"
    os.mkfifo(fifo)
    late = threading.Timer(0.5, fifo.write_text, args=(PLUGIN,))
    late.start()
    try:
        assert [spec.id for spec in load_manifest(fifo).plugins] == ["echo"]
    finally:
        late.join(timeout=10)


def test_a_fifo_nobody_writes_to_is_refused_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It waited for a writer for ever: `dispatcher validate` hung, and so did a reload on
    # the event loop of a running dispatcher.
    monkeypatch.setattr(includes, "PIPE_WAIT_SECONDS", 0.5)
    fifo = tmp_path / "plugins.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    refused = problem(fifo)
    assert "no end of file within 0.5 s" in refused, refused
    assert time.monotonic() - started < 5


def test_a_pipe_whose_writer_stalls_is_refused_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(includes, "PIPE_WAIT_SECONDS", 0.5)
    fifo = tmp_path / "plugins.yaml"
    os.mkfifo(fifo)
    released = threading.Event()

    def stall() -> None:
        with fifo.open("w") as pipe:
            pipe.write(PLUGIN[:20])
            pipe.flush()
            released.wait(timeout=30)

    writer = threading.Thread(target=stall)
    writer.start()
    try:
        assert "no end of file within 0.5 s" in problem(fifo)
    finally:
        released.set()
        writer.join(timeout=10)


@pytest.mark.parametrize("planted", ["fifo", "/dev/null", "directory"])
def test_an_include_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, planted: str
) -> None:
    # An included file is read again on every reload, which a pipe cannot be: an include
    # naming a FIFO hung the load, or any later reload, waiting for a writer.
    (tmp_path / "plugins.d").mkdir()
    included = tmp_path / "plugins.d" / "more.yaml"
    if planted == "fifo":
        os.mkfifo(included)
    elif planted == "directory":
        included.mkdir()
    else:
        included.symlink_to(planted)
    main = write(tmp_path, "version: 1\ninclude: [plugins.d/*.yaml]\n")
    started = time.monotonic()
    with pytest.raises(ManifestError) as caught:
        load_manifest(main)
    assert time.monotonic() - started < 5
    [rendered] = [found.render(caught.value.source) for found in caught.value.problems]
    assert "more.yaml" in rendered, rendered
    expected = "is a directory" if planted == "directory" else "not a regular file"
    assert expected in rendered.lower(), rendered


HTTP_WITH_CA = """\
version: 1
plugins:
  - id: remote
    version: 1.0.0
    target: {provider: http, url: "https://127.0.0.1:9", tls: {ca_file: CA}}
    methods: {say: {}}
"""


@pytest.mark.parametrize("planted", ["fifo", "socket", "/dev/zero"])
def test_a_path_in_a_manifest_naming_a_fifo_socket_or_device_is_refused_at_load(
    tmp_path: Path, planted: str
) -> None:
    # A ca_file that was a FIFO hung the first call for ever: OpenSSL waited for a writer,
    # on the event loop. Every path a manifest names (TLS files, modules, contexts) is a
    # file or a folder.
    ca = tmp_path / "ca.pem"
    if planted == "fifo":
        os.mkfifo(ca)
    elif planted == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(ca))
        listener.close()
    else:
        ca.symlink_to(planted)
    refused = problem(write(tmp_path, HTTP_WITH_CA.replace("CA", "ca.pem")))
    named = "/dev/zero" if planted == "/dev/zero" else "ca.pem"  # the symlink resolved
    assert "tls.ca_file: " in refused, refused
    assert f"{named} is a" in refused and "not a file or a folder" in refused, refused
    missing = write(tmp_path, HTTP_WITH_CA.replace("CA", "later.pem"), "missing.yaml")
    assert [spec.id for spec in load_manifest(missing).plugins] == ["remote"]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("- a\n- b\n", "the file is a list, not a mapping"),
        ('"plugins"\n', "the file is a string, not a mapping"),
    ],
)
def test_a_file_that_is_no_mapping_says_what_a_manifest_is(
    tmp_path: Path, text: str, said: str
) -> None:
    # It was pydantic's own words, naming the generic model's parameters:
    # "Input should be a valid dictionary or instance of Manifest[Annotated[LocalTarget, …".
    refused = problem(write(tmp_path, text))
    assert said in refused and "'version: 1' and 'plugins'" in refused, refused
    assert "Manifest[" not in refused and "Annotated" not in refused, refused


def test_a_file_name_with_control_characters_is_shown_escaped(tmp_path: Path) -> None:
    # The name was printed raw: one holding an escape sequence set the terminal's title.
    named = write(tmp_path, "", "a\x1b]0;PWNED\x07.yaml")
    with pytest.raises(ManifestError) as caught:
        load_manifest(named)
    shown = str(caught.value)
    assert "\x1b" not in shown and "\x07" not in shown, shown
    assert "a\\x1b]0;PWNED\\x07.yaml" in shown, shown


def test_an_empty_manifest_path_is_a_usage_error_not_a_folder(tmp_path: Path) -> None:
    for args in (["-m", "", "validate"], ["validate", "-m", ""]):
        run = subprocess.run(
            [sys.executable, "-m", "dispatcher.cli", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
        assert run.returncode == 2 and "empty: name the manifest file" in run.stderr, run.stderr


@pytest.mark.parametrize("name", ["plugins.yaml", "plugins.toml"])
def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path, name: str) -> None:
    refused = problem(write(tmp_path, b"version: 1\n\n# caf\xe9\n", name))
    assert "not UTF-8 text: byte 0xe9" in refused, refused
    assert f"{name}:3:" in refused, refused


# -- where files are read ---------------------------------------------------------------


async def test_a_reload_of_such_a_file_is_refused_and_the_dispatcher_serves_on(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, PLUGIN)
    async with Dispatcher.from_file(path) as dispatcher:
        for hostile in (with_config(laughs(11)), with_config(nested_flow(3_000))):
            # A reload runs on the event loop: a file that took hours to read stopped
            # every call in flight for as long.
            write(tmp_path, hostile)
            with pytest.raises(ManifestError):
                await dispatcher.reload_from_file()
            assert await dispatcher.call("echo", "say", {"text": "still"}) is not None


@pytest.mark.parametrize(
    "hostile",
    [with_config(laughs(10)), with_config(nested_flow(10_000)), b"version: 1\n\xff\n"],
    ids=["aliases", "depth", "bytes"],
)
def test_the_cli_says_what_is_wrong_exit_2_without_a_traceback(
    tmp_path: Path, hostile: str | bytes
) -> None:
    path = write(tmp_path, hostile)
    run = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "-m", str(path), "validate"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=100,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert str(path) in run.stderr
