#!/usr/bin/env bash
# Throughput through the durable queue against a backend that answers at once (an in-process
# fake over real loopback HTTP), at concurrency 1, 8 and 64. Prints a Markdown table.
#   scripts/bench-throughput.sh            # 20,000 lines per run
#   BENCH_LINES=50000 scripts/bench-throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test main bench::bench_throughput -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -E '^\|'
