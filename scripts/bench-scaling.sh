#!/usr/bin/env bash
# One coordinator in front of many simulated model servers: BENCH_BACKENDS (32) servers × 8
# slots, 200 ms a call (ideal: backends × 40 requests/s), BENCH_LINES (20,000) lines; prints
# requests/s, the share of the ideal, CPU cores used (coordinator and the simulated servers,
# which run in the same process) and the store's size. Release build.
#   scripts/bench-scaling.sh
#   BENCH_BACKENDS=64 BENCH_LINES=50000 scripts/bench-scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test main bench::bench_many_backends -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -E '^\||^calls'
