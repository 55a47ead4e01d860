"""What the tests of plugins built against this checkout's SDKs share: the toolchains,
subprocess runs with their output on failure, and the SDK builds a plugin depends on,
each done at most once per run and reusing what ``make sdks`` built.

- Rust: a plugin's ``target/`` is a symlink to ``sdk/rust/target``, so it compiles only
  its own crate and the SDK's (the dependencies are compiled there already, same profile).
- Java: the SDK is installed into ``~/.m2`` (``mvn install``), skipped when the installed
  jar is newer than every SDK source.
- TypeScript: the SDK's ``build.sh`` (idempotent) leaves the ``dist/`` a ``file:``
  dependency copies.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
GO = shutil.which("go") or "/usr/local/go/bin/go"
CARGO = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
MVN = shutil.which("mvn") or "mvn"
NPM = shutil.which("npm") or "npm"
SDK = ROOT / "sdk"
#: Where cargo compiles: make sdks' target folder, shared (cargo locks it while building).
RUST_TARGET = SDK / "rust" / "target"
#: The flags sdk/go/build.sh compiles with: a test's Go build in a plugin's folder then
#: reuses what `make sdks` compiled of the SDK's requirements (grpc, protobuf: ~40 s on two
#: cores) instead of compiling them again under the default flags.
GO_AS_MAKE_SDKS = {"CGO_ENABLED": "0", "GOFLAGS": "-trimpath -buildvcs=false"}
#: Maven's own JVM with C1's code only: a build is over before C2's compiles would pay (the
#: Java scaffold's test and package took 34 s of CPU with both compilers, 23 s with C1).
#: A ``MAVEN_OPTS`` of the environment's own wins.
MAVEN_BUILD_JVM = {"MAVEN_OPTS": "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"}
#: Offline toolchains: a test that needs the network is a test that fails on CI.
OFFLINE = {
    "GOPROXY": "off",
    "GOTOOLCHAIN": "local",
    "CARGO_NET_OFFLINE": "true",
    "CARGO_BUILD_JOBS": "2",
}


def run(
    command: list[str], folder: Path, *, timeout: float = 900, **environment: str
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``folder`` with this interpreter's bin first on ``PATH``."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        command,
        cwd=folder,
        env={**MAVEN_BUILD_JVM, **os.environ, "PATH": path, **environment},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def succeed(command: list[str], folder: Path, **environment: str) -> str:
    """Run ``command``; its stdout, or a failure that shows what it printed."""
    done = run(command, folder, **environment)
    assert done.returncode == 0, f"{' '.join(command)} in {folder}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def require(tool: str) -> None:
    if not (Path(tool).exists() or shutil.which(tool)):
        pytest.skip(f"no {Path(tool).name} here")


def share_rust_target(plugin: Path) -> None:
    """Point the plugin's ``target/`` at the SDK's, as a symlink: ``target/release/NAME``
    stays where the plugin's ``plugins.yaml`` looks for it."""
    RUST_TARGET.mkdir(exist_ok=True)
    (plugin / "target").symlink_to(RUST_TARGET, target_is_directory=True)


@functools.cache
def install_java_sdk() -> None:
    """``mvn install`` of ``sdk/java`` (no tests: ``make sdks`` ran them), unless ``~/.m2``
    holds a jar newer than every SDK source; offline first, as sdk/java/build.sh does."""
    require(MVN)
    sdk = SDK / "java"
    installed = Path.home() / ".m2/repository/dev/linchkit/linchkit-plugin-sdk"
    jars = list(installed.glob("*/linchkit-plugin-sdk-*.jar"))
    sources = [sdk / "pom.xml", ROOT / "proto" / "plugin.proto", *(sdk / "src").rglob("*")]
    if jars and max(jar.stat().st_mtime for jar in jars) > max(s.stat().st_mtime for s in sources):
        return
    install = [MVN, "-B", "-q", "install", "-DskipTests"]
    if run([*install[:3], "-o", *install[3:]], sdk).returncode != 0:
        succeed(install, sdk)


@functools.cache
def build_typescript_sdk() -> None:
    require(NPM)
    succeed(["bash", str(SDK / "typescript" / "build.sh")], ROOT, VENV=str(BIN.parent))


@functools.cache
def build_typescript_client() -> Path:
    """``clients/typescript/build.sh`` (idempotent): the host client and its tests,
    compiled; returns the package's folder."""
    require(NPM)
    folder = ROOT / "clients" / "typescript"
    succeed(["bash", str(folder / "build.sh")], ROOT)
    return folder
