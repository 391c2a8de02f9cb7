"""End to end: every feature through sglang-router in front of two servers, over
``/v1/completions`` (sglang-router 0.3.2 re-serialises the bodies of ``/generate`` and
``/v1/chat/completions`` without ``custom_params``), with the router's affinity by routing key
for groups that span requests; the same results as one server.
"""

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sglang_entropy.tools import server as sglang_server
from sglang_entropy.tools.client import routing_headers

pytestmark = pytest.mark.server
# two servers beside the session's on a small machine: small KV pools
SMALL = ["--max-total-tokens", "8192", "--entropy-policies", "deepconf,eager"]


@pytest.fixture(scope="module")
def routed(model_path):
    with (
        sglang_server.launch(model_path, extra_args=SMALL) as first,
        sglang_server.launch(model_path, extra_args=SMALL) as second,
        sglang_server.router([first.url, second.url]) as router,
    ):
        yield router, (first, second)


def completion(url, entropy, headers=None, **body):
    body = {"model": "default", "prompt": "3 + 4 =", "max_tokens": 16, **body, "custom_params": {"entropy": entropy}}
    response = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def test_signals_come_back_through_the_router_as_from_one_server(routed):
    router, (first, _) = routed
    entropy = {"return_signals": ["entropy", "confidence"]}
    through = completion(router.url, entropy, temperature=0)
    direct = completion(first.url, entropy, temperature=0)
    assert through["choices"][0]["text"] == direct["choices"][0]["text"]
    [signals] = [entry["signals"] for entry in through["metadata"]["entropy"]]
    assert len(signals["entropy"]) == through["usage"]["completion_tokens"]
    for name, values in direct["metadata"]["entropy"][0]["signals"].items():
        assert signals[name] == pytest.approx(values, rel=1e-3, abs=1e-3)


def test_an_invalid_request_is_a_400_through_the_router(routed):
    router, _ = routed
    body = {"model": "default", "prompt": "Hi", "max_tokens": 2, "custom_params": {"entropy": {"policy": "nope"}}}
    response = requests.post(f"{router.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and "custom_params.entropy.policy" in response.text


def test_a_group_of_n_traces_calibrates_through_the_router(routed):
    router, _ = routed
    out = completion(router.url, {"policy": "deepconf", "params": {"warmup_traces": 2}}, n=4, temperature=1.0)
    roles = sorted(entry["group"]["role"] for entry in out["metadata"]["entropy"])
    assert roles == ["calibrated", "calibrated", "warmup", "warmup"]


def test_a_named_group_meets_on_one_server_by_its_routing_key(routed):
    router, _ = routed
    group = f"g-{uuid.uuid4().hex[:8]}"
    entropy = {"policy": "deepconf", "params": {"group_id": group, "warmup_traces": 2}}
    headers = routing_headers(entropy)
    assert headers == {sglang_server.ROUTING_KEY_HEADER: group}
    roles = []
    for _ in range(4):  # four requests of one trace each: two warm up, two join the calibrated group
        out = completion(router.url, entropy, headers=headers, temperature=1.0)
        roles.append(out["metadata"]["entropy"][0]["group"]["role"])
    assert roles == ["warmup", "warmup", "calibrated", "calibrated"]


def test_an_eager_tree_and_a_budget_group_hold_through_the_router(routed):
    router, _ = routed
    eager = {"policy": "eager", "params": {"threshold": 0.5, "max_sequences": 4}, "return_signals": ["topk_entropy"]}
    out = completion(router.url, eager, prompt="Name a colour:", max_tokens=12, temperature=0.7)
    sequences = [entry["sequence"] for entry in out["metadata"]["entropy"]]
    assert 1 < len(sequences) <= 4 and len(out["choices"]) == len(sequences) and sequences[0]["parent"] is None

    # two requests at once share a budget of 3 sequences: their routing key sends both to one
    # server, where the budget is kept (each alone would fork to 3 at a threshold of 0)
    params = {"threshold": 0.0, "max_sequences": 3, "budget_group": uuid.uuid4().hex, "budget": 3}
    pool = {"policy": "eager", "params": params}
    headers = routing_headers(pool)
    with ThreadPoolExecutor(2) as workers:
        outs = list(
            workers.map(
                lambda prompt: completion(
                    router.url, pool, headers=headers, prompt=prompt, temperature=0.7, max_tokens=12, ignore_eos=True
                ),
                ["What is 3 + 4?", "Name a colour."],
            )
        )
    assert sum(len(out["choices"]) for out in outs) == 3


def test_the_routes_that_lose_the_options_behind_the_router(routed):
    """What the README warns of, pinned to sglang-router 0.3.2: its /generate and chat routes
    forward no custom_params, so the server never sees the options (use /v1/completions)."""
    router, _ = routed
    entropy = {"return_signals": ["entropy"]}
    chat = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    chat["custom_params"] = {"entropy": entropy}
    out = requests.post(f"{router.url}/v1/chat/completions", json=chat, timeout=600).json()
    assert "entropy" not in (out.get("metadata") or {})
    native = {"text": "Hi", "sampling_params": {"max_new_tokens": 4, "custom_params": {"entropy": entropy}}}
    assert "entropy" not in requests.post(f"{router.url}/generate", json=native, timeout=600).json()["meta_info"]
