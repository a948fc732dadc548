#!/usr/bin/env bash
# Runs the whole pipeline locally (see scripts/run_local.py): installs the Tansu broker into
# .venv, builds the release binaries, then runs agent → relay → Kafka → sink on sample logs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/services/install.sh
cargo build --release --workspace --all-targets --locked
exec .venv/bin/python scripts/run_local.py "$@"
