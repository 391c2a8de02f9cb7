#!/usr/bin/env bash
# SGLang's STANDALONE speculative decoding on a plain CPU with two drafters routed by taps.
# Build the drafters first (about 40 minutes on 2 cores): sglang-entropy-drafters
# Usage: examples/launch_taps_cpu.sh [PORT]
set -euo pipefail
MODEL=$(sglang-entropy build-model)
DRAFTERS=${SGLANG_ENTROPY_CACHE:-$HOME/.cache/sglang-entropy}/specroute-drafters
SGLANG_PLATFORM=portable_cpu exec python -m sglang.launch_server \
    --model-path "$MODEL" --port "${1:-30000}" \
    --device cpu --attention-backend torch_native --sampling-backend pytorch \
    --page-size 1 --dtype float32 --max-total-tokens 8192 \
    --speculative-algorithm STANDALONE --speculative-draft-model-path "$DRAFTERS/math" \
    --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4 \
    --entropy-drafters "$DRAFTERS/math,$DRAFTERS/chat"
