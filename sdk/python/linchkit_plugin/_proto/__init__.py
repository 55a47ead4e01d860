"""Generated from proto/plugin.proto by scripts/gen_proto.py; do not edit."""
