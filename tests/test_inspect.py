"""``dispatcher inspect``: the effective sandbox of each target, read from the manifest
and the machine, without starting anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_cli import run_cli, write_manifest
from tests.wasm_support import sha256_of

MODULE = ROOT / "sdk" / "go" / "dist" / "example-plugin.wasm"


def test_inspect_prints_each_targets_sandbox_and_what_it_cannot_enforce(tmp_path: Path) -> None:
    plugin = {
        "id": "calc",
        "version": "1.0.0",
        "capabilities": {
            "network": ["api.example.com", "10.0.0.0/8"],
            "files": [{"path": str(tmp_path), "mode": "ro"}],
            "env": ["HOME"],
            "memory_mb": 64,
            "cpu_s": 2,
            "pids": 16,
        },
        "target": {"provider": "wasm", "module": str(MODULE), "sha256": "0" * 64},
        "methods": {
            "echo": {},
            "sub": {
                "target": {"provider": "subprocess", "command": ["/bin/true"], "sandbox": True}
            },
            "box": {"target": {"provider": "docker", "image": "linchkit/none:1"}},
            "web": {"target": {"provider": "http", "url": "http://127.0.0.1:9"}},
        },
    }
    done = run_cli("inspect", "calc", "-m", str(write_manifest(tmp_path, plugin)))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "capabilities: network: api.example.com, 10.0.0.0/8" in out
    assert "memory: 64 MiB of linear memory" in out  # wasm
    # wasm: the dispatcher answers the module's HTTP, so a network is a grant it enforces
    assert "network: HTTP(S) to api.example.com, 10.0.0.0/8 (URLs naming an address in it)" in out
    assert "limits: nofile=256 nproc=16 cpu=2 as=67108864" in out  # subprocess
    if shutil.which("bwrap"):
        assert "NOT ENFORCED: network: limited to api.example.com, 10.0.0.0/8" in out
    else:
        assert "NOT ENFORCED: namespaces: bubblewrap (bwrap) is not installed" in out
    assert "NOT ENFORCED: cpu_s: 2.0 CPU seconds has no Docker form" in out  # docker
    assert "not sandboxed by the http provider" in out
    assert not list(tmp_path.glob("*.sock"))  # nothing was started


def test_inspect_of_an_unknown_plugin_is_a_usage_error(tmp_path: Path) -> None:
    done = run_cli("inspect", "nope", "-m", str(write_manifest(tmp_path, {
        "id": "calc", "version": "1.0.0",
        "target": {"provider": "http", "url": "http://127.0.0.1:9"}, "methods": {"echo": {}},
    })))  # fmt: skip
    assert done.returncode == 2
    assert "no plugin 'nope' in the manifest (known: calc)" in done.stderr


@pytest.mark.toolchain  # the Go SDK's wasm example (make sdks)
def test_health_names_what_a_sandbox_cannot_enforce(tmp_path: Path) -> None:
    module = ROOT / "sdk" / "go" / "dist" / "example-plugin.wasm"
    plugin = {
        "id": "calc",
        "version": "1.0.0",
        "capabilities": {"env": ["LINCHKIT_INSPECT_NEVER_SET"]},
        "target": {"provider": "wasm", "module": str(module), "sha256": sha256_of(module)},
        "methods": {"echo": {}},
    }
    done = run_cli("health", "-m", str(write_manifest(tmp_path, plugin)))
    assert done.returncode == 0, done.stderr
    assert (
        "calc@1.0.0 wasm example-plugin.wasm (pooled, 4): NOT ENFORCED: env: LINCHKIT_INSPECT_NEVER_SET is granted but not set"
        in done.stdout
    )
