#!/usr/bin/env bash
# Regenerates docs/dashboard.png: the dashboard in headless Chromium, mid-run against the fake
# Ollama backend of the tests (two finished batches, one running). Needs Debian's chromium
# (apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --test main dashboard_screenshot -- --ignored --nocapture
echo "wrote docs/dashboard.png"
