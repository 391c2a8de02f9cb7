#!/usr/bin/env bash
# Two servers with the adapter behind sglang-router (pip install sglang-router), on a plain CPU.
# The router runs its manual policy: requests with the same x-smg-routing-key header go to the
# same server, which is where a named group (group_id) or a budget group (budget_group) must
# meet; sglang_entropy.tools.client.routing_headers(entropy) gives that header. Send requests
# through the router's /v1/completions: its /generate and /v1/chat/completions drop custom_params.
# Usage: examples/launch_router.sh [ROUTER_PORT]   (the servers take the next two ports)
set -euo pipefail
MODEL=$(sglang-entropy build-model)
PORT=${1:-30000}
serve() {
    SGLANG_PLATFORM=portable_cpu python -m sglang.launch_server \
        --model-path "$MODEL" --port "$1" \
        --device cpu --attention-backend torch_native --sampling-backend pytorch --max-total-tokens 16384 \
        --enable-entropy --entropy-config "$(dirname "$0")/entropy.toml" &
}
serve $((PORT + 1))
serve $((PORT + 2))
trap 'kill $(jobs -p) 2>/dev/null' EXIT
python -m sglang_router.launch_router --host 127.0.0.1 --port "$PORT" --policy manual \
    --worker-urls "http://127.0.0.1:$((PORT + 1))" "http://127.0.0.1:$((PORT + 2))"
