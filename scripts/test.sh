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
# Four workers, a test file each at a time (each worker starts its own Tansu, moto and
# fake-gcs-server): the suite waits on timers (lateness, idle cuts, host time-outs, stalls longer
# than a time-out), not on the CPU. With four workers on two cores the CPU was still 53-88 % idle;
# the 29 slowest tests took 1.5 % longer in all than with two (the most, 24 %, were tests that
# push a backlog through), while the suite's wall time fell from 22.1 to 12.0 min. The longest
# file (test_sink_fencing.py, about 10 min) is now the floor. No test asserts a timing.
# Four is also the most tests/services/servers.py has port slices for; it refuses more.
# --durations shows where the time goes.
.venv/bin/python -m pytest tests/e2e -v -p no:cacheprovider -n 4 --dist loadfile --durations=30

step "done"
