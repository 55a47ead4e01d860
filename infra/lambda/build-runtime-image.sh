#!/usr/bin/env bash
# Build the local Lambda runtime image the tests run handler code in; idempotent.
#
# Nothing is pulled from a container registry (there is none here): the image is a tar of
# this machine's own Debian Python 3.11 files, plus the real AWS runtime pieces from PyPI:
#   - aws-lambda-rie, the Runtime Interface Emulator, shipped inside the aws-sam-cli wheel;
#   - awslambdaric, the Python runtime interface client (the same code as Lambda's python3.11).
# The result is `docker import`ed as $IMAGE, labelled with a hash of its inputs, so a second
# run with nothing changed returns in well under a second.
#
# Usage: infra/lambda/build-runtime-image.sh [PYTHON]   (PYTHON: a pip-capable Python 3.11)
set -euo pipefail

IMAGE="${LAMBDA_RUNTIME_IMAGE:-linchkit-lambda-python:3.11}"
SAM_CLI_VERSION="1.170.0"
RIC_VERSION="4.2.2"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="$ROOT/.cache/lambda"
PYTHON="${1:-python3}"
PACKAGES=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libstdc++6
          libgcc-s1 zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libuuid1 libcrypt1
          libsqlite3-0 media-types)

if ! docker info >/dev/null 2>&1; then
  echo "build-runtime-image: no Docker engine; run scripts/start-docker.sh first" >&2
  exit 1
fi

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
fi

inputs="$(sha256sum "$0" | cut -c1-64) sam=$SAM_CLI_VERSION ric=$RIC_VERSION \
$(dpkg-query -W -f='${Package}=${Version} ' "${PACKAGES[@]}")"
hash="$(printf '%s' "$inputs" | sha256sum | cut -c1-16)"
if [ "$(docker image inspect -f '{{index .Config.Labels "linchkit.inputs"}}' "$IMAGE" 2>/dev/null)" = "$hash" ]; then
  exit 0
fi
echo "build-runtime-image: building $IMAGE ($hash)" >&2

mkdir -p "$CACHE"
rie="$CACHE/aws-lambda-rie-x86_64-$SAM_CLI_VERSION"
if [ ! -x "$rie" ]; then
  download="$(mktemp -d)"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$download" \
    "aws-sam-cli==$SAM_CLI_VERSION"
  "$PYTHON" -m zipfile -e "$download"/aws_sam_cli-*.whl "$download/wheel"
  install -m 0755 "$download/wheel/samcli/local/rapid/aws-lambda-rie-x86_64" "$rie"
  rm -rf "$download"
fi

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
# The files of the Debian packages (no docs, no man pages), paths kept as installed.
dpkg -L "${PACKAGES[@]}" 2>/dev/null | sort -u | while read -r path; do
  case "$path" in /usr/share/doc/*|/usr/share/man/*|/usr/share/lintian/*|/usr/share/locale/*) continue ;; esac
  # Merged /usr: /lib, /lib64 and /bin are symlinks into /usr here and in the image.
  case "$path" in /lib/*|/lib64/*|/bin/*|/sbin/*) path="/usr$path" ;; esac
  if [ -f "$path" ] || [ -L "$path" ]; then printf '%s\n' "${path#/}"; fi
done >"$stage/files"
mkdir -p "$stage/root"
tar -C / --no-recursion -cf - -T "$stage/files" | tar -C "$stage/root" -xf -
# Debian's merged /usr: the loader and libraries are found through /lib and /lib64.
ln -s usr/lib "$stage/root/lib"
ln -s usr/lib64 "$stage/root/lib64"
ln -s usr/bin "$stage/root/bin"
ln -sf python3.11 "$stage/root/usr/bin/python3"
mkdir -p "$stage/root/var/task" "$stage/root/var/runtime" "$stage/root/tmp" "$stage/root/etc"
chmod 1777 "$stage/root/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$stage/root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$stage/root/etc/group"
"$PYTHON" -m pip install --quiet --no-compile --target "$stage/root/var/runtime" \
  --only-binary=:all: --implementation cp --python-version 3.11 \
  --platform manylinux2014_x86_64 "awslambdaric==$RIC_VERSION"
install -D -m 0755 "$rie" "$stage/root/usr/local/bin/aws-lambda-rie"

tar -C "$stage/root" -cf - . | docker import \
  --change 'ENV LAMBDA_TASK_ROOT=/var/task' \
  --change 'ENV LAMBDA_RUNTIME_DIR=/var/runtime' \
  --change 'ENV PYTHONPATH=/var/task:/var/runtime' \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'WORKDIR /var/task' \
  --change "LABEL linchkit.inputs=$hash" \
  --change 'ENTRYPOINT ["/usr/local/bin/aws-lambda-rie"]' \
  - "$IMAGE" >/dev/null
echo "build-runtime-image: $IMAGE ready" >&2
