"""End to end: requests of several sequences stream (a deepconf group, an eager tree), natively
and over OpenAI, and give the same sequences, signals and events as the same requests
unstreamed."""

import json

import numpy as np
import openai
import pytest
import requests
from sglang_entropy_branch import client as branch_client
from sglang_entropy_prune.voting import lowest_group_confidence

from sglang_entropy.testing import reference

pytestmark = pytest.mark.server
WINDOW = 8  # deepconf's window on the session's server


@pytest.fixture(scope="module")
def question(tokenizer):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4? Explain briefly."}], tokenize=False, add_generation_prompt=True
    )


def generate(server, text, sampling, stream):
    # the same request, streamed or not, starts from an empty radix cache: a cache hit changes
    # the prefill's batch shapes and so the low bits of its logits
    requests.post(f"{server.url}/flush_cache", timeout=60).raise_for_status()
    body = {"text": text, "sampling_params": sampling, "stream": stream}
    response = requests.post(f"{server.url}/generate", json=body, timeout=900, stream=stream)
    assert response.status_code == 200, response.text
    if not stream:
        outputs = response.json()
        return outputs if isinstance(outputs, list) else [outputs]
    chunks = []
    for line in response.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunks.append(json.loads(line[len(b"data: ") :]))
    return chunks


def assemble(chunks):
    """index -> the sequence the chunks of that index make: text, signals, events, finish
    reason and the last chunk's entropy fields; also the order the indices first appeared in."""
    sequences, order = {}, []
    for chunk in chunks:
        index = chunk["index"]
        if index not in sequences:
            order.append(index)
            sequences[index] = {"signals": {}, "events": [], "chunks": 0}
        sequence = sequences[index]
        entropy = chunk["meta_info"]["entropy"]
        for name, values in entropy["signals"].items():
            sequence["signals"].setdefault(name, []).extend(values)
        sequence["events"] += entropy["events"]
        sequence["chunks"] += 1
        sequence["text"] = chunk["text"]  # SGLang's default streaming repeats the text and ids so far
        sequence["output_ids"] = chunk["output_ids"]
        sequence["finish_reason"] = chunk["meta_info"]["finish_reason"]
        sequence["last"] = entropy
    return sequences, order


def assert_same_values(streamed: dict, whole: dict):
    assert set(streamed["signals"]) == set(whole["signals"])
    for name, values in whole["signals"].items():
        # the same tokens; the values may differ in low bits where the decode batches did
        assert streamed["signals"][name] == pytest.approx(values, rel=1e-3, abs=1e-3)
    assert [e["kind"] for e in streamed["events"]] == [e["kind"] for e in whole["events"]]
    assert [e["token_index"] for e in streamed["events"]] == [e["token_index"] for e in whole["events"]]


def test_a_streamed_group_gives_the_traces_of_the_same_group_unstreamed(entropy_server, question):
    # a fixed threshold: every trace starts at once, so both runs decode the same batches
    entropy = {"policy": "deepconf", "params": {"threshold": 9.0}, "return_signals": ["confidence"]}
    sampling = {"max_new_tokens": 32, "temperature": 0, "n": 3, "custom_params": {"entropy": entropy}}
    whole = generate(entropy_server, question, sampling, stream=False)
    chunks = generate(entropy_server, question, sampling, stream=True)
    streamed, _ = assemble(chunks)
    assert sorted(streamed) == [0, 1, 2]
    assert sum(s["chunks"] for s in streamed.values()) > 2 * 3  # the traces did stream
    for index, output in enumerate(whole):
        meta = output["meta_info"]
        trace = streamed[index]
        assert trace["text"] == output["text"]
        assert trace["finish_reason"] == meta["finish_reason"]
        assert_same_values(trace, meta["entropy"])
        assert len(trace["signals"]["confidence"]) == meta["completion_tokens"]
        assert (trace["last"]["group"]["role"], trace["last"]["group"]["threshold"]) == ("calibrated", 9.0)
    assert any("entropy_policy" in s["finish_reason"] for s in streamed.values())  # the threshold did stop
    # the vote comes once, in the response's last chunk, when every trace has finished
    votes = [c["meta_info"]["entropy"]["group"].get("vote") for c in chunks]
    assert all(v is None for v in votes[:-1])
    assert votes[-1] == whole[0]["meta_info"]["entropy"]["group"]["vote"]


def test_a_streamed_group_calibrates_on_its_streamed_warmup_traces(entropy_server, question):
    entropy = {"policy": "deepconf", "params": {"warmup_traces": 2, "percentile": 50}, "return_signals": ["confidence"]}
    sampling = {"max_new_tokens": 32, "temperature": 1.0, "n": 5, "custom_params": {"entropy": entropy}}
    streamed, _ = assemble(generate(entropy_server, question, sampling, stream=True))
    roles = {index: s["last"]["group"]["role"] for index, s in streamed.items()}
    assert sorted(roles.values()) == ["calibrated"] * 3 + ["warmup"] * 2
    lowest = [
        lowest_group_confidence(s["signals"]["confidence"], WINDOW)
        for s in streamed.values()
        if s["last"]["group"]["role"] == "warmup"
    ]
    threshold = np.percentile(lowest, 50)
    for trace in streamed.values():
        if trace["last"]["group"]["role"] != "calibrated":
            continue
        assert trace["last"]["group"]["threshold"] == pytest.approx(threshold, rel=1e-9)
        # a calibrated trace stops at its first full window below the threshold, by its streamed values
        means = reference.window_means(trace["signals"]["confidence"], WINDOW)
        crossings = [i for i in range(WINDOW - 1, len(means)) if means[i] < threshold]
        if crossings:
            assert trace["finish_reason"]["token_index"] == crossings[0] == len(means) - 1
        else:
            assert "entropy_policy" not in trace["finish_reason"]


def test_a_consensus_stop_ends_the_streamed_traces(entropy_server, question):
    entropy = {"policy": "deepconf", "params": {"warmup_traces": 2, "consensus": 0.01, "min_votes": 1}}
    # greedy: the two warm-up traces give the same answer, so the vote reaches consensus (sampled
    # traces of 24 tokens sometimes held no number, and then no vote started the stop)
    sampling = {"max_new_tokens": 40, "temperature": 0, "n": 6, "custom_params": {"entropy": entropy}}
    streamed, _ = assemble(generate(entropy_server, question, sampling, stream=True))
    assert sorted(streamed) == list(range(6))
    not_started = [s for s in streamed.values() if s["last"]["group"]["role"] is None]
    assert len(not_started) == 4  # the two warm-up traces agreed: the other four never started
    assert all(s["finish_reason"]["type"] == "abort" and s["text"] == "" for s in not_started)


def tree(outputs: list[dict]) -> dict[tuple, dict]:
    """Each sequence of an eager response keyed by its path from the root: the branch token
    indices of its ancestors' forks and its own (rids differ between runs)."""
    by_id = {output["meta_info"]["id"]: output for output in outputs}

    def path(rid):
        about = by_id[rid]["meta_info"]["entropy"]["sequence"]
        return () if about["parent"] is None else (*path(about["parent"]), about["branch_token_index"])

    return {path(rid): output for rid, output in by_id.items()}


def test_a_streamed_eager_tree_gives_the_sequences_of_the_same_request_unstreamed(entropy_server, question, tokenizer):
    # sampling at the lowest temperature eager takes, so both runs make the same tokens (forks
    # come from the signals before temperature, so the tree still branches); 7 tokens stop short
    # of the answer's 8th, whose two leading tokens tie in bf16 (a coin flip at any temperature)
    entropy = {"policy": "eager", "params": {"threshold": 2.0, "max_sequences": 32}, "return_signals": ["topk_entropy"]}
    sampling = {"max_new_tokens": 7, "temperature": 1e-5, "custom_params": {"entropy": entropy}}
    whole = generate(entropy_server, question, sampling, stream=False)
    chunks = generate(entropy_server, question, sampling, stream=True)
    streamed, order = assemble(chunks)
    assert order == sorted(order) and order[0] == 0  # indices are handed out in order
    assert len(streamed) == len(whole) > 1
    # the streamed sequences as the unstreamed response would hold them
    rebuilt = [
        {
            "text": s["text"],
            "output_ids": s["output_ids"],
            "meta_info": {
                "id": s["last"]["sequence"]["id"],
                "finish_reason": s["finish_reason"],
                "entropy": {**s["last"], "signals": s["signals"], "events": s["events"]},
            },
        }
        for s in streamed.values()
    ]
    streamed_tree, whole_tree = tree(rebuilt), tree(whole)
    assert set(streamed_tree) == set(whole_tree)
    for path, output in whole_tree.items():
        assert len(streamed_tree[path]["output_ids"]) == len(output["output_ids"])
        assert streamed_tree[path]["meta_info"]["finish_reason"] == output["meta_info"]["finish_reason"]
        assert_same_values(streamed_tree[path]["meta_info"]["entropy"], output["meta_info"]["entropy"])
    # the same whole outputs
    whole_texts = sorted(s.text for s in branch_client.sequences(whole, tokenizer, lambda text: None))
    assert sorted(s.text for s in branch_client.sequences(rebuilt, tokenizer, lambda text: None)) == whole_texts
    # a fork is announced before the child's first chunk
    first_chunk = {}
    for position, chunk in enumerate(chunks):
        first_chunk.setdefault(chunk["meta_info"]["entropy"]["sequence"]["id"], position)
    for position, chunk in enumerate(chunks):
        for event in chunk["meta_info"]["entropy"]["events"]:
            for child in event.get("children", []):
                assert first_chunk[child] > position


def openai_choices(stream) -> dict[int, dict]:
    """choice index -> text, finish reason and the entropy entries of an OpenAI stream."""
    choices = {}
    for chunk in stream:
        entries = (chunk.model_extra.get("metadata") or {}).get("entropy") or [None] * len(chunk.choices)
        for choice, entry in zip(chunk.choices, entries, strict=True):
            seen = choices.setdefault(choice.index, {"text": "", "signals": {}, "events": [], "finish_reason": None})
            seen["text"] += choice.text
            seen["finish_reason"] = choice.finish_reason or seen["finish_reason"]
            if entry:
                for name, values in entry["signals"].items():
                    seen["signals"].setdefault(name, []).extend(values)
                seen["events"] += entry["events"]
                seen["last"] = entry
    return choices


def test_openai_streams_a_group_and_an_eager_tree(entropy_server):
    client = openai.OpenAI(base_url=f"{entropy_server.url}/v1", api_key="none")
    group = {"policy": "deepconf", "params": {"threshold": 4.0}, "return_signals": ["confidence"]}
    request = {"model": "default", "prompt": "3 + 4 =", "max_tokens": 16, "temperature": 0, "n": 3}
    whole = client.completions.create(**request, extra_body={"custom_params": {"entropy": group}})
    streamed = openai_choices(
        client.completions.create(**request, stream=True, extra_body={"custom_params": {"entropy": group}})
    )
    assert sorted(streamed) == [0, 1, 2]
    for choice, entry in zip(whole.choices, whole.metadata["entropy"], strict=True):
        assert streamed[choice.index]["text"] == choice.text
        assert_same_values(streamed[choice.index], entry)
        assert streamed[choice.index]["last"]["group"]["threshold"] == 4.0

    eager = {"policy": "eager", "params": {"threshold": 1.0, "max_sequences": 4}, "return_signals": ["topk_entropy"]}
    chat = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0.7,
        stream=True,
        extra_body={"custom_params": {"entropy": eager}},
    )
    choices = {}
    for chunk in chat:
        entries = (chunk.model_extra.get("metadata") or {}).get("entropy") or [None] * len(chunk.choices)
        for choice, entry in zip(chunk.choices, entries, strict=True):
            seen = choices.setdefault(choice.index, {"tokens": 0, "sequence": None, "finish_reason": None})
            seen["finish_reason"] = choice.finish_reason or seen["finish_reason"]
            if entry:
                seen["tokens"] += len(entry["signals"]["topk_entropy"])
                seen["sequence"] = entry["sequence"]
    assert 1 < len(choices) <= 4 and sorted(choices) == list(range(len(choices)))
    assert choices[0]["sequence"]["parent"] is None
    ids = {c["sequence"]["id"] for c in choices.values()}
    assert all(c["sequence"]["parent"] in ids for i, c in choices.items() if i > 0)
    assert all(c["finish_reason"] is not None and c["tokens"] > 0 for c in choices.values())
