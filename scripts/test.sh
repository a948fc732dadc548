#!/usr/bin/env bash
# The full test suite, on a fresh machine: installs what the tests need (Python venv with the
# real servers and clients), builds the release binaries once, runs the unit and integration
# tests, lint, and the end-to-end suites against real servers on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }

step "installing test servers and clients"
bash tests/services/install.sh

step "building release binaries"
cargo build --release --workspace --all-targets --locked

step "unit and integration tests"
cargo test --release --workspace --locked

step "format and lint"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings

step "Prometheus rules: promtool check rules, promtool test rules"
promtool check rules deploy/prometheus/tron.rules.yml
(cd deploy/prometheus && promtool test rules tron.rules.test.yml)

step ".deb package: contents, unpacked binaries check the example configs, systemd-analyze"
bash scripts/package.sh

step "end-to-end suites (real Tansu, moto, fake-gcs-server)"
# Two workers, a test file each at a time (each worker starts its own Tansu, moto and
# fake-gcs-server): most of the suite waits on timers (lateness, idle cuts, host time-outs),
# so two files at once halve the wall time on two cores. --durations shows where it goes.
.venv/bin/python -m pytest tests/e2e -v -p no:cacheprovider -n 2 --dist loadfile --durations=30

step "done"
