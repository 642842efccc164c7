#!/usr/bin/env bash
# Throughput with every answer checked against a JSON schema, beside the same batch without one
# (an in-process fake over real loopback HTTP that answers at once with valid JSON), at
# concurrency 8 and 64; then the cost of the check alone over 170,000 answers. Prints Markdown.
#   scripts/bench-schema.sh
#   BENCH_LINES=50000 scripts/bench-schema.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test main bench::bench_throughput_schema -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -E '^\|'
cargo test --release --lib answer::tests::bench_check_170000_answers -- --ignored --nocapture 2>&1 \
  | grep -E '^answers checked'
