"""Generated from proto/*.proto by scripts/gen_proto.py; do not edit."""
