"""What goes into a Lambda plugin's zip from its folder (``.dispatcherignore``), and that
the zip's bytes depend on the code only: not on file times, umask, order or litter.

No Lambda needed; the deploy that proves the second run publishes nothing is in
``test_lambda_deploy.py``.
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from dispatcher import parse_manifest
from linchkit_plugin.errors import ProviderError
from providers.aws_lambda.ignore import DEFAULT_IGNORE, IgnoreRules
from providers.aws_lambda.package import Package, build_package
from tests.conftest import EXAMPLES
from tests.lambda_support import echo_lambda_manifest


def plugin_folder(tmp_path: Path) -> Path:
    """A copy of the example plugin's folder, to litter."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    shutil.copy(EXAMPLES / "echo_plugin.py", folder / "echo_plugin.py")
    return folder


def package_of(folder: Path) -> Package:
    document: dict[str, Any] = echo_lambda_manifest(path=str(folder))
    plugin = parse_manifest(document, base_dir=folder).plugins[0]
    return build_package(plugin, plugin.target)  # type: ignore[arg-type]


def plugin_names(package: Package) -> set[str]:
    """The zip's names that come from the plugin's folder (not the SDK, nor orjson)."""
    return {
        name
        for name in package.names()
        if not name.startswith(("linchkit_plugin/", "orjson", "linchkit_handler.py"))
    }


def litter(folder: Path) -> None:
    """What a folder collects by being worked in: none of it is code for the function."""
    (folder / "plugin.log").write_text("a line\n" * 100)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "echo_plugin.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (folder / ".venv" / "lib").mkdir(parents=True)
    (folder / ".venv" / "lib" / "site.py").write_text("# a whole environment\n")
    (folder / "tests").mkdir()
    (folder / "tests" / "test_echo.py").write_text("def test(): pass\n")
    (folder / ".env").write_text("API_KEY=hunter2\n")
    (folder / "build").mkdir()
    (folder / "build" / "echo-plugin.zip").write_bytes(b"PK old package")


def test_litter_and_file_times_leave_the_zip_byte_for_byte_the_same(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path)
    before = package_of(folder)
    litter(folder)
    (folder / ".dispatcherignore").write_text("# nothing of mine\n")
    os.utime(folder / "echo_plugin.py", (0, 2_000_000_000))
    (folder / "echo_plugin.py").chmod(0o600)  # another umask, another checkout
    after = package_of(folder)
    assert after.zip_bytes == before.zip_bytes
    assert plugin_names(after) == {"echo_plugin.py"}


def test_a_real_change_changes_the_hash(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path)
    before = package_of(folder)
    (folder / "helpers.py").write_text("VALUE = 1\n")
    assert package_of(folder).code_sha256 != before.code_sha256


def test_the_zip_is_normalised_entry_by_entry(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path)
    tool = folder / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o700)
    package = package_of(folder)
    with zipfile.ZipFile(io.BytesIO(package.zip_bytes)) as archive:
        infos = archive.infolist()
    assert [info.filename for info in infos] == sorted(info.filename for info in infos)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.create_system for info in infos} == {3}
    modes = {info.filename: info.external_attr >> 16 for info in infos}
    assert modes["bin/tool"] == 0o755  # a bundled tool still runs on Lambda
    assert {mode for name, mode in modes.items() if name != "bin/tool"} == {0o644}
    assert not any(info.extra for info in infos)


def test_the_ignore_file_adds_patterns_and_takes_defaults_back(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path)
    litter(folder)
    (folder / "data").mkdir()
    (folder / "data" / "big.bin").write_bytes(b"\x00" * 1000)
    (folder / "data" / "keep.json").write_text("{}")
    (folder / "notes.md").write_text("mine\n")
    (folder / ".dispatcherignore").write_text(
        "# comments and blank lines are fine\n\n"
        "*.md\n"
        "/data/*\n"
        "!/data/keep.json\n"
        "!tests/\n"  # the tests go after all
    )
    assert plugin_names(package_of(folder)) == {
        "echo_plugin.py",
        "data/keep.json",
        "tests/test_echo.py",
    }


def test_a_secret_next_to_the_code_never_ships(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path)
    (folder / ".env").write_text("API_KEY=hunter2\n")
    (folder / ".env.production").write_text("API_KEY=hunter3\n")
    package = package_of(folder)
    assert b"hunter" not in zipfile.ZipFile(io.BytesIO(package.zip_bytes)).read("echo_plugin.py")
    assert plugin_names(package) == {"echo_plugin.py"}


def test_a_link_out_of_the_folder_stops_the_package(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path)
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = hunter2\n")
    (folder / "config.ini").symlink_to(secret)
    with pytest.raises(ProviderError, match=r"config.ini .* is a link to .*credentials, outside"):
        package_of(folder)
    # Listed in the ignore file, it is never looked at.
    (folder / ".dispatcherignore").write_text("config.ini\n")
    assert plugin_names(package_of(folder)) == {"echo_plugin.py"}


def test_links_inside_the_folder_are_followed_and_loops_are_not(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path)
    (folder / "shared").mkdir()
    (folder / "shared" / "util.py").write_text("X = 1\n")
    (folder / "util.py").symlink_to(folder / "shared" / "util.py")
    (folder / "shared" / "loop").symlink_to(folder)
    assert plugin_names(package_of(folder)) == {"echo_plugin.py", "shared/util.py", "util.py"}


def test_ignored_folders_are_not_walked(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path)
    unreadable = folder / ".venv" / "private"
    unreadable.mkdir(parents=True)
    (unreadable / "x.py").write_text("")
    unreadable.chmod(0)
    try:
        assert plugin_names(package_of(folder)) == {"echo_plugin.py"}
    finally:
        unreadable.chmod(0o755)


@pytest.mark.parametrize(
    ("path", "folder", "ignored"),
    [
        ("__pycache__", True, True),
        ("pkg/__pycache__", True, True),
        ("pkg/mod.pyc", False, True),
        ("tests", True, True),
        ("pkg/tests", True, True),
        ("test_helpers.py", False, False),  # only the tests folder, not every test_ name
        ("server.log", False, True),
        (".env", False, True),
        (".envrc", False, False),
        ("build", True, True),
        ("build.py", False, False),
        ("echo_plugin.py", False, False),
    ],
)
def test_the_defaults(path: str, folder: bool, ignored: bool) -> None:
    assert IgnoreRules(list(DEFAULT_IGNORE)).ignores(path, folder=folder) is ignored
