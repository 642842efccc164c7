#!/usr/bin/env bash
# Memory of `serve` for large batches (100,000, 500,000 and 1,000,000 lines by default; BENCH_SIZES to
# change), concurrency 64, an instant backend: peak RSS, intake rate, restart to first dispatch
# with the batch queued, run rate; then the same lines again in a batch that reuses answers
# (all answered from the store): its rate and peak RSS. Release build.
#   scripts/bench-memory.sh
#   BENCH_SIZES=100000 scripts/bench-memory.sh
#   BENCH_PAD=2000 scripts/bench-memory.sh   # unique 2,000-character lines (answers as long)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test main bench::bench_memory -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -E '^\|'
