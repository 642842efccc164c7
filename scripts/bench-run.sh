#!/usr/bin/env bash
# The whole job at full size: `csv-to-batch --sample 170000`, the conversion with a rubric, and
# `run` on the CSV (engine in-process, fake backend that answers at once), with wall time and
# peak memory of each step. BENCH_LINES=N for another size.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test main bench_run_whole_job -- --ignored --nocapture
