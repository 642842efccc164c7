#!/usr/bin/env bash
# Kills the real server with SIGKILL at random moments ITERATIONS times (default 50) during a
# run against a fake backend, restarts it each time, and checks exactly-once output.
# Prints lost, duplicated and redone counts; exits non-zero on any loss or duplicate.
#   scripts/crash-test.sh [ITERATIONS]     (CRASH_LINES=…, CRASH_SEED=… to vary or replay)
set -euo pipefail
cd "$(dirname "$0")/.."
export CRASH_ITERATIONS="${1:-50}"
export CRASH_LINES="${CRASH_LINES:-$(( CRASH_ITERATIONS * 300 ))}"
cargo test --release --test main crash::sigkill_at_random_moments -- --nocapture 2>&1 \
  | grep -E 'crash test|kill [0-9]+:|killed during|kills that found|test result|panicked|assert'
