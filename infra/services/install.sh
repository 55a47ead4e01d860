#!/usr/bin/env bash
# The local services the tests start for themselves, installed from Debian's packages:
# etcd (the registry of tests/test_etcd_*.py: etcd-server, etcd 3.4, and etcd-client, the
# etcdctl the docs' registry examples use), dnsmasq (the DNS
# server of the DNS discovery tests: dnsmasq-base, the binary without a system service),
# Prometheus (the server that scrapes a dispatcher's /metrics in
# tests/test_telemetry_prometheus.py; Debian's package also enables a system service: the
# tests never use it, they start their own) and redis-server (the shared state backend of
# tests/test_state_redis.py, Redis 7.0; the tests run their own) and bubblewrap (the
# sandbox of subprocess plugins, tests/test_subprocess_sandbox.py).
# Idempotent and quiet when all are present. Nothing is started here: each test session
# starts its own on free loopback ports (tests/services.py).
set -euo pipefail
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing ${missing[*]}: install them with apt-get (as root) and run again" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing ${missing[*]}" >&2
# Other jobs may hold the dpkg lock: apt's lock timeout waits for it instead of failing.
# The package cache may be stale or empty on a fresh machine: update once, then retry.
apt_install() {
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
if ! apt_install 2>/dev/null; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
    apt_install
fi
