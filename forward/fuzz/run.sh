#!/usr/bin/env bash
# Fuzzes the Forward decoder for $1 seconds (default 300), starting from the real frames in
# forward/tests/vectors (written by PyPI msgpack and fluent-logger). cargo-fuzz needs nightly
# rustc flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-300}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p corpus/decode
for v in ../tests/vectors/*.msgpack; do
  # The target's first byte is the read size; 0xff = whole frames.
  { printf '\xff'; cat "$v"; } >"corpus/decode/$(basename "$v")"
done
RUSTC_BOOTSTRAP=1 cargo fuzz run decode corpus/decode -- -max_total_time="$seconds" -max_len=65536 2>&1 |
  tee fuzz.log | grep -E '^(#[0-9]+ +DONE|Done|==[0-9]+==|SUMMARY)' || true
tail -n 3 fuzz.log
