#!/usr/bin/env bash
# The real SGLang server on a plain CPU with the adapter and the default model.
# Usage: examples/launch_cpu.sh [PORT]
set -euo pipefail
MODEL=$(sglang-entropy build-model)
SGLANG_PLATFORM=portable_cpu exec python -m sglang.launch_server \
    --model-path "$MODEL" --port "${1:-30000}" \
    --device cpu --attention-backend torch_native --sampling-backend pytorch --max-total-tokens 131072 \
    --enable-entropy --entropy-config "$(dirname "$0")/entropy.toml"
