"""``dispatcher new``: each scaffold passes its own test with no edits, then serves and
answers a call; names that are not plugin ids, and folders already in use, are refused
with nothing written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dispatcher.cli import main
from dispatcher.cli.new import _java_values
from tests.conftest import ROOT
from tests.sdk_toolchains import (
    CARGO,
    GO_AS_MAKE_SDKS,
    MVN,
    NPM,
    OFFLINE,
    build_typescript_sdk,
    install_java_sdk,
    require,
    share_rust_target,
    succeed,
)

BIN = Path(sys.executable).parent
GO = shutil.which("go") or "/usr/local/go/bin/go"


def run(command: list[str], folder: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=folder,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def scaffold(folder: Path, *arguments: str) -> None:
    made = run([str(BIN / "dispatcher"), "new", *arguments], folder)
    assert made.returncode == 0, made.stderr


def test_the_python_scaffold_passes_its_own_test_and_answers_a_call(tmp_path: Path) -> None:
    scaffold(tmp_path, "order-totals", "--lang", "python")
    plugin = tmp_path / "order-totals"
    assert sorted(path.name for path in plugin.iterdir()) == [
        ".gitignore",
        "README.md",
        "order_totals_plugin.py",
        "plugins.yaml",
        "pyproject.toml",
        "test_order_totals_plugin.py",
    ]
    tested = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], plugin)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "1 passed" in tested.stdout
    # What its README says to run next, as written there.
    readme = (plugin / "README.md").read_text()
    assert 'dispatcher call order-totals.greet -p \'{"name": "Ada"}\'' in readme
    assert run([str(BIN / "dispatcher"), "validate"], plugin).returncode == 0
    called = run(
        [str(BIN / "dispatcher"), "call", "order-totals.greet", "-p", '{"name": "Ada"}'], plugin
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"message": "hi, Ada", "caller": None}
    bench_greet(plugin)


@pytest.mark.toolchain
def test_the_go_scaffold_builds_offline_passes_its_test_and_answers_a_call(tmp_path: Path) -> None:
    if not Path(GO).exists():
        pytest.skip("no Go toolchain here")
    scaffold(tmp_path, "order-totals", "--lang", "go")
    plugin = tmp_path / "order-totals"
    offline = {
        **GO_AS_MAKE_SDKS,
        "GOFLAGS": f"-mod=readonly {GO_AS_MAKE_SDKS['GOFLAGS']}",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
    }
    tested = run([GO, "test", "./..."], plugin, **offline)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert run([GO, "vet", "./..."], plugin, **offline).returncode == 0
    assert run(["gofmt" if shutil.which("gofmt") else GO + "fmt", "-l", "."], plugin).stdout == ""
    built = run([GO, "build", "-o", "order-totals", "."], plugin, **offline)
    assert built.returncode == 0, built.stderr
    called = run(
        [str(BIN / "dispatcher"), "call", "order-totals.greet", "-p", '{"name": "Ada"}'], plugin
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"message": "hi, Ada", "caller": ""}
    assert served_as_grpc_greets(plugin) == {"message": "hi, Ada", "caller": ""}
    bench_greet(plugin)


def served_as_grpc_greets(plugin: Path) -> object:
    """Its README's "As a gRPC service", as written there: the service serves, the target
    line goes into plugins.yaml, and the call is answered with the manifest's config (a
    target without ``lifecycle: dispatcher`` answered "hello": the config never arrived)."""
    readme = (plugin / "README.md").read_text()
    assert "./order-totals serve --address 127.0.0.1:50051" in readme
    target = re.search(r"`(target: \{provider: grpc[^`]*)`", readme)
    assert target is not None, readme
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manifest = (plugin / "plugins.yaml").read_text()
    grpc_manifest = re.sub(
        r"target: \{provider: subprocess[^\n]*",
        target.group(1).replace("50051", str(port)),
        manifest,
    )
    (plugin / "grpc.yaml").write_text(grpc_manifest)
    service = subprocess.Popen(
        ["./order-totals", "serve", "--address", f"127.0.0.1:{port}"],
        cwd=plugin,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "LINCHKIT_PLUGIN_TOKEN": ""},
    )
    try:
        assert service.stdout is not None
        service.stdout.readline()  # the handshake line: it serves
        called = run(
            [
                str(BIN / "dispatcher"), "-m", "grpc.yaml", "call", "order-totals.greet",
                "-p", '{"name": "Ada"}',
            ],
            plugin,
        )  # fmt: skip
        assert called.returncode == 0, called.stderr
        assert "config is not sent" not in called.stderr
        return json.loads(called.stdout)
    finally:
        service.terminate()
        service.wait(timeout=10)
        service.stdout.close()  # type: ignore[union-attr]


def bench_greet(plugin: Path) -> None:
    """Its README's load line, as written there: every call of the run succeeds."""
    line = 'dispatcher bench order-totals.greet -p \'{"name": "Ada"}\' -d 5'
    assert line in (plugin / "README.md").read_text()
    benched = run([str(BIN / "dispatcher"), *shlex.split(line)[1:]], plugin)
    assert benched.returncode == 0, benched.stdout + benched.stderr
    rows = dict(row.split(None, 1) for row in benched.stdout.splitlines()[1:] if row)
    assert rows["succeeded"].endswith("(100.00%)"), benched.stdout
    assert not any(label.startswith("failed") for label in rows)


def call_greet(plugin: Path) -> object:
    """What its README says to run last, as written there."""
    assert (
        'dispatcher call order-totals.greet -p \'{"name": "Ada"}\''
        in (plugin / "README.md").read_text()
    )
    assert run([str(BIN / "dispatcher"), "validate"], plugin).returncode == 0
    called = run(
        [str(BIN / "dispatcher"), "call", "order-totals.greet", "-p", '{"name": "Ada"}'], plugin
    )
    assert called.returncode == 0, called.stdout + called.stderr
    return json.loads(called.stdout)


@pytest.mark.toolchain
def test_the_rust_scaffold_builds_offline_passes_its_test_and_answers_a_call(
    tmp_path: Path,
) -> None:
    require(CARGO)
    scaffold(tmp_path, "order-totals", "--lang", "rust")
    plugin = tmp_path / "order-totals"
    share_rust_target(plugin)
    tested = succeed([CARGO, "test", "--release"], plugin, **OFFLINE)
    assert "1 passed" in tested
    succeed([CARGO, "build", "--release"], plugin, **OFFLINE)
    assert call_greet(plugin) == {"message": "hi, Ada", "caller": ""}


@pytest.mark.toolchain
def test_the_java_scaffold_builds_offline_passes_its_test_and_answers_a_call(
    tmp_path: Path,
) -> None:
    install_java_sdk()  # the README's first step, once per run
    scaffold(tmp_path, "order-totals", "--lang", "java")
    plugin = tmp_path / "order-totals"
    succeed([MVN, "-B", "-o", "test"], plugin)
    reports = (plugin / "target" / "surefire-reports").glob("*.txt")
    assert "Tests run: 1, Failures: 0, Errors: 0" in "".join(r.read_text() for r in reports)
    succeed([MVN, "-B", "-q", "-o", "package", "-DskipTests"], plugin)
    assert call_greet(plugin) == {"message": "hi, Ada", "caller": ""}


def test_the_java_example_builds_on_the_sdk_and_junit_versions_of_the_sdk_pom() -> None:
    """``sdk/java/example`` is a plugin of its own that depends on the installed SDK: its
    pom repeats the SDK's version and JUnit's, which must move with ``sdk/java/pom.xml``
    (as the scaffold reads them from there)."""
    sdk = ROOT / "sdk" / "java"
    versions = _java_values(sdk)
    example = (sdk / "example" / "pom.xml").read_text(encoding="utf-8")
    assert f"<linchkit.sdk.version>{versions['java_sdk_version']}<" in example
    assert f"<junit.version>{versions['junit_version']}<" in example


@pytest.mark.toolchain
def test_the_typescript_scaffold_installs_offline_passes_its_test_and_answers_a_call(
    tmp_path: Path,
) -> None:
    build_typescript_sdk()  # what the file: dependency copies
    scaffold(tmp_path, "order-totals", "--lang", "typescript")
    plugin = tmp_path / "order-totals"
    succeed([NPM, "ci", "--offline", "--no-audit", "--no-fund"], plugin)
    assert "# pass 1" in succeed([NPM, "test"], plugin)
    succeed([NPM, "run", "build"], plugin)
    assert call_greet(plugin) == {"message": "hi, Ada", "caller": ""}


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "/tmp/absolute",
        "a/b",
        "Upper",
        "two  words",
        "a--b",
        "-dash",
        "trailing-",
        "9lives",
        "ünïcode",
        "",
        "x" * 65,
    ],
)
def test_a_name_that_is_not_a_plugin_id_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["new", "--", name])
    assert result.exit_code == 2
    assert "is not a plugin name" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_folder_in_use_is_refused_and_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "plugins.yaml").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)  # an empty folder, but through a symlink
    (tmp_path / "a-file").write_text("mine")
    for name in ("taken", "linked", "a-file"):
        result = CliRunner().invoke(main, ["new", name])
        assert result.exit_code == 2, result.output
        assert "nothing was written" in result.output
    assert (tmp_path / "taken" / "plugins.yaml").read_text() == "mine"
    assert list(elsewhere.iterdir()) == []
    assert (tmp_path / "a-file").read_text() == "mine"


def test_an_empty_folder_is_filled_and_an_sdk_that_is_not_there_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ready").mkdir()
    assert CliRunner().invoke(main, ["new", "ready"]).exit_code == 0
    assert (tmp_path / "ready" / "ready_plugin.py").is_file()
    missing = CliRunner().invoke(main, ["new", "gone", "--lang", "go", "--sdk", "no-such-sdk"])
    assert missing.exit_code == 2
    assert "no go SDK at" in missing.output
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize(
    ("language", "named"), [("rust", "Rust"), ("java", "Java"), ("typescript", "TypeScript")]
)
def test_an_sdk_folder_that_is_not_that_sdk_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, language: str, named: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-an-sdk").mkdir()
    (tmp_path / "not-an-sdk" / "package.json").write_text("{not json")
    result = CliRunner().invoke(
        main, ["new", "order-totals", "--lang", language, "--sdk", "not-an-sdk"]
    )
    assert result.exit_code == 2, result.output
    assert f"is not the {named} SDK" in result.output
    assert not (tmp_path / "order-totals").exists()


def test_a_java_plugin_named_as_a_java_keyword_gets_a_package_javac_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `dispatcher new new --lang java` wrote `package com.example.new;`: javac refused it.
    sdk_jar = ROOT / "sdk" / "java" / "target" / "linchkit-plugin-sdk-1.0.0.jar"
    gson = sorted((Path.home() / ".m2" / "repository" / "com" / "google").rglob("gson-*.jar"))
    if shutil.which("javac") is None or not sdk_jar.is_file() or not gson:
        pytest.skip("the Java SDK is not built here (sdk/java/build.sh)")
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["new", "new", "--lang", "java"]).exit_code == 0
    source = (
        tmp_path / "new" / "src" / "main" / "java" / "com" / "example" / "new_" / "NewPlugin.java"
    )
    assert source.read_text().startswith("package com.example.new_;")
    assert (
        "<mainClass>com.example.new_.NewPlugin</mainClass>"
        in (tmp_path / "new" / "pom.xml").read_text()
    )
    classpath = os.pathsep.join([str(sdk_jar), str(gson[-1])])
    compiled = subprocess.run(
        ["javac", "-d", str(tmp_path / "classes"), "-cp", classpath, str(source)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr


def test_an_sdk_whose_files_are_not_text_or_a_current_folder_gone_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both were tracebacks (UnicodeDecodeError, FileNotFoundError).
    binary = tmp_path / "binary-sdk"
    binary.mkdir()
    for name in ("go.mod", "go.sum", "Cargo.lock", "pom.xml"):
        (binary / name).write_bytes(b"\xff\xfe\x00")
    monkeypatch.chdir(tmp_path)
    for language in ("go", "rust", "java"):
        result = CliRunner().invoke(main, ["new", "zz", "--lang", language, "--sdk", str(binary)])
        assert result.exit_code == 2 and "is not the" in result.output, result.output
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    result = CliRunner().invoke(main, ["new", "ghost"])
    assert result.exit_code == 2 and "the current folder no longer exists" in result.output


@pytest.mark.parametrize("language", ["go", "rust", "java", "typescript"])
def test_the_readme_installs_the_dispatcher_from_its_checkout_not_from_pypi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, language: str
) -> None:
    """The dispatcher is not on PyPI: the README says what the main README's "Install"
    does, with the checkout the scaffold's SDK came from."""
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["new", "order-totals", "--lang", language]).exit_code == 0
    readme = (tmp_path / "order-totals" / "README.md").read_text()
    assert "pip install 'linchkit-dispatcher" not in readme
    install = f"pip install -e '{ROOT}/sdk/python[grpc]' -e '{ROOT}[grpc]'"
    assert install in " ".join(readme.split()), readme


def test_the_python_readme_installs_from_the_checkout_not_from_pypi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["new", "order-totals", "--lang", "python"]).exit_code == 0
    readme = (tmp_path / "order-totals" / "README.md").read_text()
    assert "pip install 'linchkit" not in readme
    assert "pip install -e 'sdk/python[http]' -e ." in readme
