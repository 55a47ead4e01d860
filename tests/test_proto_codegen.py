"""The generated protobuf code in dispatcher/_proto matches proto/plugin.proto."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_generated_code_is_fresh() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_generated_service_has_the_protocol_package() -> None:
    from dispatcher._proto import plugin_pb2

    service = plugin_pb2.DESCRIPTOR.services_by_name["PluginService"]
    assert service.full_name == "linchkit.plugin.v1.PluginService"
    assert set(service.methods_by_name) == {
        "Describe",
        "Init",
        "Start",
        "Stop",
        "Destroy",
        "Call",
        "CallBatch",
        "CallStream",
        "Events",
    }
