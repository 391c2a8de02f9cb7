#!/usr/bin/env bash
# The SGLang server on a GPU with the adapter (leave SGLANG_PLATFORM unset).
# Usage: examples/launch_gpu.sh MODEL_PATH [PORT]
set -euo pipefail
exec python -m sglang.launch_server --model-path "$1" --port "${2:-30000}" \
    --enable-entropy --entropy-policies deepconf --entropy-config "$(dirname "$0")/entropy.toml"
