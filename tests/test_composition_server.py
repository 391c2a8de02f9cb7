"""End to end: several policies in one request on the real server. An eager tree composed with
deepconf: every fork and every stop re-checked from the per-token signals each sequence
returned, a child's window including the prefix it shares with its parent."""

import uuid

import pytest
import requests
from sglang_entropy_branch.client import whole

from sglang_entropy.testing import abort_once_branched, delta, entropy_state, scrape, used_tokens

pytestmark = pytest.mark.server

SIGNALS = ["confidence", "group_confidence", "topk_entropy"]


@pytest.fixture(scope="module")
def question(tokenizer):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the moon."}], tokenize=False, add_generation_prompt=True
    )


def composed(eager: dict, deepconf: dict) -> list[dict]:
    return [{"policy": "eager", "params": eager}, {"policy": "deepconf", "params": deepconf}]


def generate(server, text, policies, rid=None, **sampling):
    body = {
        "text": text,
        "sampling_params": {
            "max_new_tokens": 24,
            "temperature": 0.8,
            "custom_params": {"entropy": {"policies": policies, "return_signals": SIGNALS}},
            **sampling,
        },
    }
    if rid is not None:
        body["rid"] = rid
    return requests.post(f"{server.url}/generate", json=body, timeout=900)


def whole_traces(sequences: list[dict]) -> dict[str, list[float]]:
    """Each sequence's token confidences over its whole trace: its ancestors' tokens before
    each branch point, then its own."""
    return whole(sequences, lambda output: output["meta_info"]["entropy"]["signals"]["confidence"])


def check_tree(sequences, eager_threshold, threshold, window, max_sequences):
    """Every fork and stop of the tree follows from the returned signals."""
    assert 1 <= len(sequences) <= max_sequences
    traces = whole_traces(sequences)
    forks = stops = 0
    for sequence in sequences:
        meta = sequence["meta_info"]
        entropy = meta["entropy"]
        assert entropy["policy"] == ["eager", "deepconf"]
        own = entropy["signals"]
        shared = len(traces[meta["id"]]) - len(own["confidence"])  # tokens inherited from the ancestors
        windows = [
            sum(traces[meta["id"]][max(0, t - window + 1) : t + 1]) / min(t + 1, window)
            for t in range(shared, len(traces[meta["id"]]))
        ]
        assert own["group_confidence"] == pytest.approx(windows, rel=1e-3, abs=1e-3)
        crossing = [i for i, g in enumerate(windows) if shared + i + 1 >= window and g < threshold]
        stop_events = [e for e in entropy["events"] if e["kind"] == "stop"]
        if crossing:  # the first token whose whole-trace window is full and below the threshold ends it
            [stop] = stop_events
            assert stop["token_index"] == crossing[0] == meta["completion_tokens"] - 1
            assert (stop["policy"], stop["reason"]) == ("deepconf", "low_group_confidence")
            assert meta["finish_reason"]["entropy_policy"] == "deepconf"
            stops += 1
        else:
            assert not stop_events
        for event in entropy["events"]:
            if event["kind"] == "branch":
                assert event["policy"] == "eager" and event["topk_entropy"] > eager_threshold
                assert own["topk_entropy"][event["token_index"]] == pytest.approx(event["topk_entropy"])
                forks += len(event["children"])
    assert forks == len(sequences) - 1
    return stops


def test_a_composed_tree_prunes_each_sequence_by_its_whole_trace(entropy_server, question):
    window = 8
    # every window is below this: each sequence ends where its whole trace first fills the window,
    # so a child forked after token 7 of its parent ends at its first token (its window is the parent's)
    policies = composed({"threshold": 0.3, "max_sequences": 6}, {"threshold": 1e5, "window_size": window})
    response = generate(entropy_server, question, policies)
    assert response.status_code == 200, response.text
    sequences = response.json()
    assert len(sequences) > 1, "the tree never forked"
    assert check_tree(sequences, 0.3, 1e5, window, 6) == len(sequences)
    traces = whole_traces(sequences)
    for sequence in sequences:
        meta = sequence["meta_info"]
        shared = len(traces[meta["id"]]) - meta["completion_tokens"]
        assert meta["completion_tokens"] == max(1, window - shared)


def test_a_composed_tree_with_a_threshold_from_the_data_follows_both_rules(entropy_server, question):
    # a threshold inside the range of group confidences this model produces, so some sequences
    # are pruned and some are not; whatever happens, it must follow from the returned signals
    probe = generate(entropy_server, question, composed({"threshold": 0.3, "max_sequences": 2}, {"threshold": 0}))
    assert probe.status_code == 200, probe.text
    values = sorted(g for s in probe.json() for g in s["meta_info"]["entropy"]["signals"]["group_confidence"])
    threshold = values[len(values) // 3]
    policies = composed({"threshold": 0.3, "max_sequences": 8}, {"threshold": threshold})
    response = generate(entropy_server, question, policies, max_new_tokens=32)
    assert response.status_code == 200, response.text
    check_tree(response.json(), 0.3, threshold, 8, 8)


def test_pruned_sequences_give_their_budget_back(entropy_server, question):
    def tree(budget_group, prune: bool):
        eager = {"threshold": 0.0, "max_sequences": 3, "budget_group": budget_group, "budget": 3}
        if prune:
            policies = composed(eager, {"threshold": 1e5, "window_size": 4})
        else:
            policies = [{"policy": "eager", "params": eager}]
        response = generate(entropy_server, question, policies)
        assert response.status_code == 200, response.text
        return response.json()

    pruned, kept = uuid.uuid4().hex, uuid.uuid4().hex
    before = scrape(entropy_server.url)
    # every sequence is pruned at its fourth token: the three it used go back to the pool, so the
    # next request of the group forks again
    assert [len(tree(pruned, prune=True)) for _ in range(2)] == [3, 3]
    assert delta(before, scrape(entropy_server.url), "sglang:entropy_budget_returned_total") == 6
    # sequences that run to their end keep their share: the group's budget is spent after one request
    assert [len(tree(kept, prune=False)) for _ in range(2)] == [3, 1]


def test_aborting_a_composed_request_frees_every_sequence(entropy_server, question):
    baseline = used_tokens(entropy_server)
    rid = f"composed-{uuid.uuid4().hex}"
    policies = composed({"threshold": 0.3, "max_sequences": 4}, {"threshold": 0})  # never prunes
    response = abort_once_branched(
        entropy_server,
        rid,
        lambda: generate(entropy_server, question, policies, rid=rid, max_new_tokens=2000, ignore_eos=True),
    )
    assert all(s["meta_info"]["finish_reason"]["type"] == "abort" for s in response.json())
    state = entropy_state(entropy_server)
    assert state["active_requests"] == state["active_slots"] == state["inherited_states"] == 0, state
    assert used_tokens(entropy_server) == baseline


@pytest.mark.parametrize(
    "entropy, n, says",
    [
        ([{"policy": "eager"}, {"policy": "eager"}], 1, "names a policy twice"),
        ([{"policy": "deepconf", "params": {"threshold": 5}}, {"policy": "eager"}], 2, "sampling_params.n"),
        ([{"policy": "deepconf", "params": {"threshold": 5, "window_size": 0}}], 1, "policies[0].params.window_size"),
        ({"policy": "deepconf", "policies": [{"policy": "echo"}]}, 1, "either one policy"),
    ],
)
def test_a_composition_that_makes_no_sense_is_a_400(entropy_server, question, entropy, n, says):
    body = {
        "text": question,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0.8, "n": n, "custom_params": {"entropy": entropy}},
    }
    response = requests.post(f"{entropy_server.url}/generate", json=body, timeout=60)
    assert response.status_code == 400 and says in response.json()["error"]["message"], response.text


def test_a_composed_request_through_openai_extra_body(entropy_server):
    import openai

    client = openai.OpenAI(base_url=f"{entropy_server.url}/v1", api_key="none")
    policies = [{"policy": "deepconf", "params": {"threshold": 1e5, "window_size": 4}}, {"policy": "echo"}]
    chat = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Tell me about the moon."}],
        max_tokens=24,
        temperature=0.8,
        extra_body={"custom_params": {"entropy": {"policies": policies, "return_signals": ["group_confidence"]}}},
    )
    [info] = chat.metadata["entropy"]
    assert info["policy"] == ["deepconf", "echo"]
    # deepconf prunes where the window of 4 first fills; echo's own events, if any, keep its name
    assert chat.usage.completion_tokens == 4 and len(info["signals"]["group_confidence"]) == 4
    stops = [e for e in info["events"] if e["kind"] == "stop"]
    assert stops[0]["policy"] == "deepconf" and stops[0]["token_index"] == 3
    assert all(e["policy"] in ("deepconf", "echo") for e in info["events"])


def test_example_prints_the_pruned_tree(entropy_server, tokenizer):
    import runpy

    example = runpy.run_path("examples/composed_tree.py")
    threshold, found, pruned, result = example["ask"](entropy_server.url, tokenizer, "What is 7 times 8?")
    assert threshold > 0 and found and all(s.text for s in found)
    assert set(pruned) <= {s.rid for s in found}
    assert result.voters == sum(1 for s in found if s.rid not in pruned and s.answer is not None)
