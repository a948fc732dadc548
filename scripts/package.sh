#!/usr/bin/env bash
# Builds target/debian/tron_*.deb from the release binaries (built first if missing) and checks
# it the way an operator would meet it: the file list, an unpacked scratch root whose binaries
# validate the example configs, and `systemd-analyze verify` on the shipped units. Prints each
# unit's `systemd-analyze security` exposure score.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same invocation as scripts/test.sh, so the binaries the tests ran are the ones packaged.
cargo build --release --workspace --all-targets --locked
rm -f target/debian/tron_*.deb
cargo deb -p tron-agent --no-build --strip --fast --quiet
deb=$(ls target/debian/tron_*.deb)
echo "built $deb ($(du -h "$deb" | cut -f1))"

contents=$(dpkg-deb --contents "$deb" | awk '{print $6}')
for want in ./usr/bin/tron-agent ./usr/bin/tron-relay ./usr/bin/tron-sink-secor \
  ./lib/systemd/system/tron-agent.service ./lib/systemd/system/tron-relay.service \
  ./lib/systemd/system/tron-sink-secor.service ./usr/share/doc/tron/examples/agent.toml \
  ./usr/share/doc/tron/examples/relay.toml ./usr/share/doc/tron/examples/sink-secor.toml \
  ./usr/share/doc/tron/deployment.md ./usr/share/doc/tron/operations.md \
  ./usr/share/tron/prometheus/tron.rules.yml ./usr/share/tron/prometheus/tron.rules.test.yml \
  ./usr/share/tron/grafana/tron.json ./etc/tron/agent.toml ./etc/tron/relay.toml ./etc/tron/sink-secor.toml; do
  grep -qxF "$want" <<<"$contents" || { echo "FAIL: $deb lacks $want"; exit 1; }
done
# Captured first, then searched: `dpkg-deb | grep -q` under pipefail fails whenever grep exits at the
# first match and dpkg-deb dies of SIGPIPE, which depends on timing.
info=$(dpkg-deb --info "$deb")
grep -q 'postinst' <<<"$info" || { echo "FAIL: $deb has no postinst (service users)"; exit 1; }
grep -q 'prerm' <<<"$info" || { echo "FAIL: $deb has no prerm (stops the services on removal)"; exit 1; }
# librdkafka is linked against the system OpenSSL (TLS and SASL to Kafka): the package must say so.
grep -Eq '^ Depends:.*libssl' <<<"$info" || { echo "FAIL: $deb does not depend on libssl"; echo "$info"; exit 1; }
conffiles=$(dpkg-deb --info "$deb" conffiles)
for conf in /etc/tron/agent.toml /etc/tron/relay.toml /etc/tron/sink-secor.toml; do
  grep -qxF "$conf" <<<"$conffiles" || { echo "FAIL: $conf is not a conffile (an upgrade would overwrite it)"; exit 1; }
done
echo "contents: ok ($(wc -l <<<"$contents") entries)"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg -x "$deb" "$root"
# The rules as installed still load and pass their unit tests (the test file names the rules
# file beside it).
promtool check rules "$root/usr/share/tron/prometheus/tron.rules.yml" >/dev/null
(cd "$root/usr/share/tron/prometheus" && promtool test rules tron.rules.test.yml >/dev/null)
python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$root/usr/share/tron/grafana/tron.json"
echo "prometheus rules and grafana dashboard: ok"
for bin in agent relay sink-secor; do
  "$root/usr/bin/tron-$bin" --version >/dev/null
  "$root/usr/bin/tron-$bin" --config "$root/etc/tron/$bin.toml" --check-config
done

# verify resolves ExecStart; point it at the unpacked binaries, and treat any finding as a failure
# (systemd-analyze exits 0 on unknown keys).
units=$(mktemp -d)
trap 'rm -rf "$root" "$units"' EXIT
for unit in "$root"/lib/systemd/system/*.service; do
  sed "s#/usr/bin/#$root/usr/bin/#g" "$unit" >"$units/$(basename "$unit")"
done
findings=$(cd "$units" && systemd-analyze verify ./*.service 2>&1 || true)
if [ -n "$findings" ]; then
  echo "FAIL: systemd-analyze verify:"; echo "$findings"; exit 1
fi
echo "systemd-analyze verify: ok"
for unit in "$units"/*.service; do
  systemd-analyze security --offline=true "$unit" 2>/dev/null | grep 'Overall exposure level' ||
    echo "$(basename "$unit"): exposure score unavailable"
done
