"""Generate the Python code of proto/*.proto into linchkit_plugin/_proto (``make proto``).

``plugin.proto`` is the plugin protocol (both sides); ``gateway.proto`` the gateway's gRPC
service (the dispatcher serves it; hosts call it). One package for both keeps one
generator, one pinned grpcio-tools and one freshness test.

    python scripts/gen_proto.py            # (re)write linchkit_plugin/_proto
    python scripts/gen_proto.py --check    # exit 1 if the committed code is stale

The proto is compiled under the virtual path ``linchkit_plugin/_proto/plugin.proto`` so the
generated ``plugin_pb2_grpc.py`` imports ``from linchkit_plugin._proto import plugin_pb2``
instead of a bare top-level ``plugin_pb2``. grpcio-tools is pinned in pyproject's dev
extra: another version writes other bytes, and tests/test_proto_codegen.py compares them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE = "linchkit_plugin/_proto"
OUTPUT = ROOT / "sdk" / "python" / PACKAGE
PROTOS = ("plugin", "gateway")
GENERATED = tuple(
    f"{proto}{suffix}" for proto in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)
INIT = '"""Generated from proto/*.proto by scripts/gen_proto.py; do not edit."""\n'


def generate(into: Path) -> dict[str, bytes]:
    """Run protoc; return the generated files by name."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        arguments = [
            "grpc_tools.protoc",
            f"-I{PACKAGE}={PROTO_DIR}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(f"{PACKAGE}/{proto}.proto" for proto in PROTOS),
        ]
        if protoc.main(arguments) != 0:
            raise SystemExit("protoc failed on proto/*.proto")
        files = {name: (Path(scratch) / PACKAGE / name).read_bytes() for name in GENERATED}
    files["__init__.py"] = INIT.encode()
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if linchkit_plugin/_proto is stale"
    )
    options = parser.parse_args()
    files = generate(OUTPUT)
    if options.check:
        stale = [
            name
            for name, content in files.items()
            if not (OUTPUT / name).is_file() or (OUTPUT / name).read_bytes() != content
        ]
        if stale:
            print(f"stale generated code in {PACKAGE}: {', '.join(stale)}; run `make proto`")
            return 1
        return 0
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (OUTPUT / name).write_bytes(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
