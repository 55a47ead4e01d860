#!/usr/bin/env bash
# Build the plugin base image `linchkit/python-base` offline, from this machine's own
# Debian packages (python3.11 and the libraries it links) plus the project's plugin SDK.
# Nothing is pulled from a registry. Idempotent: the image is tagged with a hash of its
# inputs, and a second run with nothing changed only checks that the tag exists (<1 s).
#
#   infra/docker/build-base-image.sh            # uses .venv/bin/python for the SDK's deps
#   PYTHON=/path/to/python infra/docker/build-base-image.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
if ! dpkg -s python3.11-minimal libpython3.11-stdlib >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq python3.11-minimal libpython3.11-stdlib >/dev/null
fi
exec "$PYTHON" "$ROOT/infra/docker/build_base_image.py" "$@"
