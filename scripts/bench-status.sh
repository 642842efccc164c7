#!/usr/bin/env bash
# Latency of GET /status and GET /metrics while a 50,000-line batch runs at full speed
# (concurrency 64, a backend that answers at once). Prints a Markdown table.
#   BENCH_LINES=100000 scripts/bench-status.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test main bench::bench_status_latency -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -E '^\|'
