"""End to end: after a known workload, the adapter's counters on SGLang's ``/metrics`` equal
what the responses' events say (the session's server runs with ``--enable-metrics``; its
config sets deepconf's window to 8 tokens)."""

import pytest
import requests

from sglang_entropy.testing import delta, scrape

pytestmark = pytest.mark.server
WINDOW = 8


def generate(server, text, entropy, **sampling):
    sampling_params = {"temperature": 0.7, **sampling, "custom_params": {"entropy": entropy}}
    response = requests.post(f"{server.url}/generate", json={"text": text, "sampling_params": sampling_params})
    assert response.status_code == 200, response.text
    body = response.json()
    return body if isinstance(body, list) else [body]


def test_counters_equal_what_the_responses_say(entropy_server):
    before = scrape(entropy_server.url)
    prompts = ["What is 3 + 4?", "Name a colour.", "Write a word."]
    pruned = [
        o
        for text in prompts
        for o in generate(
            entropy_server,
            text,
            {"policy": "deepconf", "params": {"threshold": 100.0}},
            max_new_tokens=32,
            ignore_eos=True,
        )
    ]
    branched = generate(
        entropy_server,
        "Write one word.",
        {"policy": "eager", "params": {"threshold": 0.0, "max_sequences": 3}},
        max_new_tokens=8,
    )
    group = generate(
        entropy_server, "What is 3 + 4?", {"policy": "deepconf", "params": {"warmup_traces": 2}}, n=3, max_new_tokens=12
    )
    after = scrape(entropy_server.url)

    stops = [e for o in pruned + group for e in o["meta_info"]["entropy"]["events"] if e["kind"] == "stop"]
    reasons = [e["reason"] for e in stops]
    assert delta(before, after, "sglang:entropy_stops_total", policy="deepconf", reason="low_group_confidence") == len(
        reasons
    )
    assert len([o for o in pruned if o["meta_info"]["completion_tokens"] == WINDOW]) == 3  # each stopped at 8
    saved = sum(32 - o["meta_info"]["completion_tokens"] for o in pruned)
    saved += sum(
        12 - o["meta_info"]["completion_tokens"] for o in group if "entropy_policy" in o["meta_info"]["finish_reason"]
    )
    assert delta(before, after, "sglang:entropy_saved_tokens_total", policy="deepconf") == saved
    deepconf_tokens = sum(o["meta_info"]["completion_tokens"] for o in pruned + group)
    assert delta(before, after, "sglang:entropy_generated_tokens_total", policy="deepconf") == deepconf_tokens
    eager_tokens = sum(o["meta_info"]["completion_tokens"] for o in branched)
    assert delta(before, after, "sglang:entropy_generated_tokens_total", policy="eager") == eager_tokens
    assert delta(before, after, "sglang:entropy_requests_total", policy="deepconf") == len(prompts) + 1
    assert delta(before, after, "sglang:entropy_requests_total", policy="eager") == 1

    children = [
        c for o in branched for e in o["meta_info"]["entropy"]["events"] if e["kind"] == "branch" for c in e["children"]
    ]
    assert len(branched) == 1 + len(children)
    assert delta(before, after, "sglang:entropy_forks_total", outcome="applied") == len(children)
    assert delta(before, after, "sglang:entropy_sequences_per_request_count") == 1
    assert delta(before, after, "sglang:entropy_sequences_per_request_sum") == len(branched)

    thresholds = {
        o["meta_info"]["entropy"]["group"]["threshold"]
        for o in group
        if o["meta_info"]["entropy"]["group"]["role"] == "calibrated"
    }
    assert delta(before, after, "sglang:entropy_group_calibrations_total", policy="deepconf") == 1
    assert delta(before, after, "sglang:entropy_calibrated_threshold_sum", policy="deepconf") == pytest.approx(
        thresholds.pop()
    )
    assert delta(before, after, "sglang:entropy_policy_failures_total", policy="deepconf") == 0
