"""The generated protobuf code in linchkit_plugin/_proto matches proto/plugin.proto."""

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
    from linchkit_plugin._proto import plugin_pb2

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


def test_importing_the_dispatcher_and_loading_grpc_targets_does_not_import_grpcio() -> None:
    code = (
        "import sys\n"
        "from dispatcher import parse_manifest\n"
        "parse_manifest({'version': 1, 'plugins': [\n"
        "  {'id': 'a', 'version': '1.0.0', 'methods': {'m': {}},\n"
        "   'target': {'provider': 'grpc', 'address': '127.0.0.1:1'}},\n"
        "  {'id': 'b', 'version': '1.0.0', 'methods': {'m': {}},\n"
        "   'target': {'provider': 'subprocess', 'command': ['plugin']}}]})\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in {'grpc', 'cryptography', 'google'}]\n"
        "print(heavy)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert ran.stdout.strip() == "[]"
