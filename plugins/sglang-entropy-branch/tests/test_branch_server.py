"""End to end (work in progress): the eager policy forks sequences inside the real server."""

import uuid

import pytest
import requests

from sglang_entropy.testing import abort_once_branched, entropy_state, generate, used_tokens

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def question(tokenizer):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True
    )


def eager(server, text, params, rid=None, **sampling):
    entropy = {"policy": "eager", "params": params, "return_signals": ["topk_entropy"]}
    return generate(
        server, text, entropy, rid=rid, timeout=900, **{"max_new_tokens": 24, "temperature": 0.7, **sampling}
    )


def test_branches_fork_where_topk_entropy_exceeds_the_threshold(entropy_server, question):
    requests.post(f"{entropy_server.url}/flush_cache", timeout=60).raise_for_status()
    threshold = 1.5
    sequences = eager(entropy_server, question, {"threshold": threshold, "max_sequences": 4})
    assert 1 < len(sequences) <= 4
    by_id = {s["meta_info"]["id"]: s for s in sequences}
    for sequence in sequences:
        meta = sequence["meta_info"]
        entropy = meta["entropy"]["signals"]["topk_entropy"]
        for event in meta["entropy"]["events"]:
            if event["kind"] == "branch":
                assert entropy[event["token_index"]] == pytest.approx(event["topk_entropy"])
                assert event["topk_entropy"] > threshold
                for child_id in event["children"]:
                    child = by_id[child_id]["meta_info"]
                    assert child["entropy"]["sequence"] == {
                        "id": child_id,
                        "parent": meta["id"],
                        "branch_token_index": event["token_index"],
                    }
        parent = meta["entropy"]["sequence"]["parent"]
        if parent is not None:
            # the child's input is the root prompt plus the parent's tokens before the branch, and
            # all but its last token were found in the radix tree, where only its ancestors put them
            assert meta["cached_tokens"] == meta["prompt_tokens"] - 1
            parent_meta = by_id[parent]["meta_info"]
            assert (
                meta["prompt_tokens"]
                == parent_meta["prompt_tokens"] + meta["entropy"]["sequence"]["branch_token_index"]
            )


def test_aborting_a_branching_request_frees_every_sequence(entropy_server, question):
    baseline = used_tokens(entropy_server)
    rid = f"eager-{uuid.uuid4().hex}"
    params = {"threshold": 0.5, "max_sequences": 4}
    sequences = abort_once_branched(
        entropy_server,
        rid,
        lambda: eager(entropy_server, question, params, rid=rid, max_new_tokens=2000, ignore_eos=True),
    )
    assert all(s["meta_info"]["finish_reason"]["type"] == "abort" for s in sequences)
    state = entropy_state(entropy_server)
    assert state["active_requests"] == 0 and state["active_slots"] == 0
    assert used_tokens(entropy_server) == baseline


def test_eager_needs_sampling(entropy_server, question):
    body = {
        "text": question,
        "sampling_params": {"temperature": 0, "custom_params": {"entropy": {"policy": "eager"}}},
    }
    response = requests.post(f"{entropy_server.url}/generate", json=body, timeout=60)
    assert response.status_code == 400 and "temperature > 0" in response.json()["error"]["message"]


def test_requests_of_a_budget_group_share_its_budget(entropy_server, tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    group = uuid.uuid4().hex
    questions = ["What is 3 + 4?", "Name a colour.", "Write a word that rhymes with cat."]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    params = {"threshold": 0.5, "max_sequences": 4, "budget_group": group, "budget": 5}
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda text: eager(entropy_server, text, params), texts))
    counts = [len(sequences) for sequences in answers]
    assert sum(counts) == 5, counts  # at threshold 0.5 every prompt wants to branch: the pool runs dry
    assert all(1 <= c <= 4 for c in counts)


def test_client_rebuilds_each_sequence_as_the_server_built_it(entropy_server, question, tokenizer):
    from sglang_entropy_branch.client import sequences

    outputs = eager(entropy_server, question, {"threshold": 1.5, "max_sequences": 6})
    found = sequences(outputs, tokenizer, lambda text: None)
    root_prompt = outputs[0]["meta_info"]["prompt_tokens"]
    for sequence, output in zip(found, outputs, strict=True):
        meta = output["meta_info"]
        # the server's child input is the root prompt plus the shared tokens: same count as the client's
        shared = len(sequence.token_ids) - meta["completion_tokens"]
        assert shared == meta["prompt_tokens"] - root_prompt
        assert sequence.token_ids[shared:] == output["output_ids"]


def test_example_prints_sequences_and_a_vote(entropy_server, tokenizer):
    import runpy

    example = runpy.run_path("examples/eager_branches.py")
    found = example["ask"](entropy_server.url, tokenizer, "What is 3 + 4?", threshold=1.5, max_sequences=4)
    assert len(found) > 1 and all(s.text for s in found)
