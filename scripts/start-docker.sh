#!/usr/bin/env bash
# Install and start a Docker engine for the tests that need one; idempotent.
# Only the host and none networks exist here: run containers with --network host or none.
set -euo pipefail
if ! command -v dockerd >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq docker.io >/dev/null
fi
if docker info >/dev/null 2>&1; then
  exit 0
fi
mkdir -p /var/log
nohup dockerd --iptables=false --bridge=none >/var/log/dockerd.log 2>&1 &
for _ in $(seq 1 150); do
  if [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 0.2
done
echo "dockerd did not start; see /var/log/dockerd.log" >&2
tail -20 /var/log/dockerd.log >&2 || true
exit 1
