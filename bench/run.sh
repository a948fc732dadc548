#!/usr/bin/env bash
# Benchmarks (figures, not pass/fail): see bench/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/services/install.sh
cargo build --release --workspace --all-targets --locked
exec .venv/bin/python bench/bench.py "$@"
