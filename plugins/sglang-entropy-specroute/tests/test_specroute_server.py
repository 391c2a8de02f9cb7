"""End to end: two drafters for one target, routed per request and step by the ``taps`` policy.

Drafter A is the target itself (SmolLM2-135M-Instruct), drafter B a copy truncated to its first
two layers (no training: only the mechanics are checked). Greedy output must not change with
routing: whichever chain is verified, the committed tokens are the target's argmax.
"""

import pytest
import requests

from sglang_entropy.testing import delta, scrape
from sglang_entropy.tools import server as sglang_server

pytestmark = pytest.mark.server

QUESTIONS = ["What is 7 times 8?", "Write a short poem about autumn leaves.", "Explain what a prime number is."]
MAX_NEW_TOKENS = 40
COMMON_ARGS = ["--page-size", "1", "--dtype", "float32", "--max-total-tokens", "8192"]
# Request 0 names no policy (taps' defaults), 1 asks for taps per request, 2 forces drafter B.
CUSTOM = [
    None,
    {"entropy": {"policy": "taps", "params": {"granularity": "request"}}},
    {"entropy": {"policy": "taps", "params": {"drafter": 1}}},
]


# what a speculative server cannot give (no sampling observer there), and the field each names
REFUSED = [
    {"entropy": {"return_signals": ["entropy"]}},
    {"entropy": {"policy": "deepconf", "params": {"threshold": 1.0}}},
]
REFUSED_FIELDS = ["custom_params.entropy.return_signals", "custom_params.entropy.policy"]


def truncated_copy(model_path, out_dir, layers=2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out_dir)
    return out_dir


def run(model_path, prompts, extra_args):
    """The outputs of one batch, and the adapter's metrics after it (the server runs with
    ``--enable-metrics``)."""
    args = [*COMMON_ARGS, *extra_args, "--enable-metrics"]
    with sglang_server.launch(model_path, enable_entropy=False, extra_args=args) as server:
        params = [
            {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, **({"custom_params": c} if c else {})} for c in CUSTOM
        ]
        before = scrape(server.url)
        response = requests.post(
            f"{server.url}/generate", json={"text": prompts, "sampling_params": params}, timeout=900
        )
        assert response.status_code == 200, f"{response.status_code}: {response.text}\n{server.log_tail()}"
        after = scrape(server.url)
        refused = [
            requests.post(
                f"{server.url}/generate",
                json={"text": prompts[0], "sampling_params": {"max_new_tokens": 2, "custom_params": custom}},
                timeout=60,
            )
            for custom in REFUSED
        ]
        return response.json(), (before, after), refused


@pytest.fixture(scope="module")
def outputs(model_path, tokenizer, tmp_path_factory):
    if sglang_server.has_gpu():
        pytest.skip("checks the portable CPU platform's speculative path")
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    small = truncated_copy(model_path, tmp_path_factory.mktemp("drafter") / "SmolLM2-2layers")
    # One server at a time: on a small CPU machine two would compete for the same cores.
    plain, _, plain_refused = run(model_path, prompts, [])
    assert all(r.status_code == 200 for r in plain_refused)  # a plain server gives both
    routed, metrics, refused = run(
        model_path, prompts, sglang_server.standalone_args(model_path, 3, [model_path, small])
    )
    return plain, routed, metrics, refused


def routes(output):
    return [e for e in output["meta_info"]["entropy"]["events"] if e["kind"] == "route"]


def test_routed_greedy_output_equals_plain_decoding(outputs):
    plain, routed, *_ = outputs
    for p, r in zip(plain, routed, strict=True):
        assert r["output_ids"] == p["output_ids"]
        assert r["text"] == p["text"]


def test_every_step_routes_to_the_most_confident_drafter(outputs):
    _, routed, *_ = outputs
    for output in routed:
        events = routes(output)
        assert len(events) == output["meta_info"]["spec_verify_ct"], output["meta_info"]
        for event in events:
            assert len(event["confidences"]) == 2 and all(0 < c <= 1 for c in event["confidences"]), event
            assert event["drafter_name"] == ["SmolLM2-135M-Instruct", "SmolLM2-2layers"][event["drafter"]]
    # Per step (request 0, taps' defaults): always the argmax of the reported confidences.
    for event in routes(routed[0]):
        assert event["confidences"][event["drafter"]] == max(event["confidences"]), event
    # Per request: the first step's argmax, kept.
    first, *later = routes(routed[1])
    assert first["confidences"][first["drafter"]] == max(first["confidences"]), first
    assert all(e["drafter"] == first["drafter"] for e in later)


def test_a_forced_drafter_is_always_verified(outputs):
    _, routed, *_ = outputs
    events = routes(routed[2])
    assert events and all(e["drafter"] == 1 and e["drafter_name"] == "SmolLM2-2layers" for e in events)


def test_acceptance_length_is_reported_and_agrees_with_sglang(outputs):
    _, routed, *_ = outputs
    for output in routed:
        meta = output["meta_info"]
        events = routes(output)
        assert meta["entropy"]["acceptance_length"] == pytest.approx(sum(e["accepted"] for e in events) / len(events))
        # SGLang counts the prefill's token too and the last step's tokens past max_new_tokens
        # are cut: completion_tokens = 1 + sum(accepted) - cut, cut < tokens per step.
        committed = sum(e["accepted"] for e in events)
        assert committed + 1 - 4 < meta["completion_tokens"] <= committed + 1, meta
        assert meta["spec_accept_length"] == pytest.approx(meta["completion_tokens"] / len(events))


def test_only_the_chosen_chain_is_verified(outputs):
    # Drafter A is the target itself: its chains are mostly accepted (and keep being so after
    # steps routed to B, which needs its KV kept in step); the 2-layer B's almost never are.
    _, routed, *_ = outputs
    on_a = [e["accepted"] for e in routes(routed[0]) if e["drafter"] == 0]
    assert on_a and sum(on_a) / len(on_a) > 2, on_a
    forced_b = [e["accepted"] for e in routes(routed[2])]
    assert sum(forced_b) / len(forced_b) < 1.5, forced_b


def test_route_metrics_equal_the_route_events(outputs):
    _, routed, (before, after), _ = outputs
    events = [e for output in routed for e in routes(output)]
    for name in ("SmolLM2-135M-Instruct", "SmolLM2-2layers"):
        expected = sum(e["drafter_name"] == name for e in events)
        assert delta(before, after, "sglang:entropy_routes_total", drafter=name) == expected
    assert delta(before, after, "sglang:entropy_accepted_tokens_per_step_count") == len(events)
    assert delta(before, after, "sglang:entropy_accepted_tokens_per_step_sum") == sum(e["accepted"] for e in events)


def test_what_a_speculative_server_cannot_give_is_a_clear_400(outputs):
    *_, refused = outputs
    for response, field in zip(refused, REFUSED_FIELDS, strict=True):
        assert response.status_code == 400 and field in response.text
        assert "--speculative-algorithm STANDALONE" in response.text
