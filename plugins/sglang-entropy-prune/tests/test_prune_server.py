"""End to end: the prune plugin's policies on the real server with SmolLM2-135M-Instruct.

The session's server enables ``deepconf`` and ``echo``; its config sets deepconf's window to
8 tokens. Every check recomputes the policy's decisions from the per-token signals returned."""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests
from sglang_entropy_prune.voting import lowest_group_confidence, traces_from_outputs, vote
from test_prune import echo_reference

from sglang_entropy.testing import entropy_state, generate, reference, used_tokens

pytestmark = pytest.mark.server
WINDOW = 8


@pytest.fixture(scope="module")
def question(tokenizer):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4? Explain briefly."}], tokenize=False, add_generation_prompt=True
    )


def deepconf_group(server, text, params, n, max_new_tokens=40, rid=None, **sampling):
    entropy = {"policy": "deepconf", "params": params, "return_signals": ["confidence"]}
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "n": n, **sampling}
    return generate(server, text, entropy, rid=rid, timeout=900, **sampling)


def assert_first_crossing(meta, threshold):
    """The trace ended exactly at its first full window below ``threshold``, or never crossed."""
    confidence = meta["entropy"]["signals"]["confidence"]
    means = reference.window_means(confidence, WINDOW)
    crossings = [i for i in range(WINDOW - 1, len(means)) if means[i] < threshold]
    stopped = "entropy_policy" in meta["finish_reason"]
    if crossings:
        assert stopped and crossings[0] == len(confidence) - 1 == meta["finish_reason"]["token_index"]
    else:
        assert not stopped
    return stopped


def test_group_calibration_sets_the_threshold_from_the_warmup_traces(entropy_server, question):
    outputs = deepconf_group(entropy_server, question, {"warmup_traces": 4, "percentile": 50}, n=10)
    metas = [o["meta_info"] for o in outputs]
    roles = [m["entropy"]["group"]["role"] for m in metas]
    assert sorted(roles) == ["calibrated"] * 6 + ["warmup"] * 4
    warmups = [m for m in metas if m["entropy"]["group"]["role"] == "warmup"]
    assert not any("entropy_policy" in m["finish_reason"] for m in warmups), "warm-up traces run in full"
    lowest = [lowest_group_confidence(m["entropy"]["signals"]["confidence"], WINDOW) for m in warmups]
    expected = np.percentile(lowest, 50)
    for meta in metas:
        if meta["entropy"]["group"]["role"] == "calibrated":
            assert meta["entropy"]["group"]["threshold"] == pytest.approx(expected, rel=1e-9)
            assert_first_crossing(meta, expected)
    # the server's vote is the client library's confidence-weighted vote over the same traces
    client = vote(traces_from_outputs(outputs), window=WINDOW)
    assert metas[0]["entropy"]["group"]["vote"]["answer"] == client.weighted


def test_requests_sharing_a_group_id_form_one_group(entropy_server, question):
    group_id = uuid.uuid4().hex
    params = {"group_id": group_id, "warmup_traces": 2, "percentile": 90}
    with ThreadPoolExecutor(5) as pool:
        metas = list(pool.map(lambda _: deepconf_group(entropy_server, question, params, n=1)["meta_info"], range(5)))
    warmups = [m for m in metas if m["entropy"]["group"]["role"] == "warmup"]
    assert len(warmups) == 2 and all(m["entropy"]["group"]["id"] == group_id for m in metas)
    expected = np.percentile(
        [lowest_group_confidence(m["entropy"]["signals"]["confidence"], WINDOW) for m in warmups], 90
    )
    for meta in metas:
        if meta not in warmups:
            assert meta["entropy"]["group"]["threshold"] == pytest.approx(expected, rel=1e-9)
            assert_first_crossing(meta, expected)


def test_consensus_stops_the_group(entropy_server, question):
    params = {"warmup_traces": 2, "consensus": 0.01, "min_votes": 1}
    outputs = deepconf_group(entropy_server, question, params, n=8)
    metas = [o["meta_info"] for o in outputs]
    started = [m for m in metas if m["entropy"]["group"]["role"] is not None]
    assert len(started) == 2  # the warm-up traces agreed with themselves: nothing more starts
    assert all(m["finish_reason"]["type"] == "abort" and m["completion_tokens"] == 0 for m in metas if m not in started)
    assert metas[0]["entropy"]["group"]["vote"]["support"] >= 0.01


def test_a_group_takes_one_prompt(entropy_server, question):
    entropy = {"policy": "deepconf"}
    for body in (
        {"text": [question, question], "sampling_params": {"n": 2, "custom_params": {"entropy": entropy}}},
        {"text": question, "sampling_params": {"custom_params": {"entropy": entropy}}},  # n = 1: needs a threshold
    ):
        response = requests.post(f"{entropy_server.url}/generate", json=body, timeout=60)
        assert response.status_code == 400 and "custom_params.entropy" in response.json()["error"]["message"]


def test_aborting_a_group_frees_every_trace(entropy_server, question):
    baseline = used_tokens(entropy_server)
    rid = f"group-{uuid.uuid4().hex}"
    params = {"warmup_traces": 4}
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            outputs=deepconf_group(
                entropy_server, question, params, n=12, max_new_tokens=2000, rid=rid, ignore_eos=True
            )
        )
    )
    worker.start()
    deadline = time.time() + 120
    while entropy_state(entropy_server)["active_requests"] < 4:
        assert time.time() < deadline, "the warm-up traces never started"
        time.sleep(0.2)
    time.sleep(1.0)
    requests.post(f"{entropy_server.url}/abort_request", json={"rid": rid}, timeout=60).raise_for_status()
    worker.join(timeout=300)
    assert not worker.is_alive()
    metas = [o["meta_info"] for o in result["outputs"]]
    assert all(m["finish_reason"]["type"] == "abort" for m in metas)
    assert all(m["completion_tokens"] < 2000 for m in metas)
    state = entropy_state(entropy_server)
    assert state["active_requests"] == 0 and state["active_slots"] == 0
    assert used_tokens(entropy_server) == baseline


def test_a_burst_of_64_pruned_requests_leaves_no_state_behind(entropy_server, prompts):
    baseline = used_tokens(entropy_server)
    entropy = {"policy": "deepconf", "params": {"threshold": 6.0}, "return_signals": ["confidence"]}

    def one(i):
        body = {
            "text": prompts[i % len(prompts)],
            "sampling_params": {"max_new_tokens": 48, "temperature": 1.0, "custom_params": {"entropy": entropy}},
        }
        return requests.post(f"{entropy_server.url}/generate", json=body, timeout=900).json()["meta_info"]

    with ThreadPoolExecutor(64) as pool:
        metas = list(pool.map(one, range(64)))
    stopped = sum(assert_first_crossing(meta, 6.0) for meta in metas)
    assert stopped > 0
    state = entropy_state(entropy_server)
    assert state["active_requests"] == 0 and state["active_slots"] == 0
    assert used_tokens(entropy_server) == baseline


@pytest.fixture(scope="module")
def prompts(tokenizer):
    questions = ["What is 7 times 8?", "Write a short poem about autumn.", "Explain what a prime number is."]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


def test_echo_stops_where_its_criteria_first_hold(entropy_server, prompts):
    params = {"min_group_confidence": 2.0, "tail_max": 3.0, "spike_min": 0.5, "run_length": 3}
    entropy = {"policy": "echo", "params": params, "return_signals": ["entropy", "confidence"]}
    body = {
        "text": prompts * 4,
        "sampling_params": {"max_new_tokens": 64, "temperature": 1.0, "custom_params": {"entropy": entropy}},
    }
    outputs = requests.post(f"{entropy_server.url}/generate", json=body, timeout=900).json()
    full = {"lowest_group_confidence": True, "tail_decline": True, "entropy_spike": True, **params}
    reasons = set()
    for output in outputs:
        meta = output["meta_info"]
        signals = meta["entropy"]["signals"]
        expected = echo_reference(signals["entropy"], signals["confidence"], 16, full)
        stops = [e for e in meta["entropy"]["events"] if e["kind"] == "stop"]
        if expected is None:
            assert stops == [] and "entropy_policy" not in meta["finish_reason"]
        else:
            index, reason = expected
            assert (stops[0]["token_index"], stops[0]["reason"]) == expected
            assert meta["completion_tokens"] == index + 1
            reasons.add(reason)
    assert reasons, "no trace was stopped: the test would not see a wrong stop"


def test_openai_n_runs_a_calibrated_group(entropy_server):
    client = openai.OpenAI(base_url=f"{entropy_server.url}/v1", api_key="none")
    completion = client.completions.create(
        model="default",
        prompt="3 + 4 =",
        max_tokens=24,
        temperature=1.0,
        n=6,
        extra_body={"custom_params": {"entropy": {"policy": "deepconf", "params": {"warmup_traces": 3}}}},
    )
    assert len(completion.choices) == 6
    groups = [entry["group"] for entry in completion.metadata["entropy"]]
    assert sorted(g["role"] for g in groups) == ["calibrated"] * 3 + ["warmup"] * 3


def test_frontend_program_runs_a_group_and_votes(entropy_server):
    import runpy

    import sglang as sgl
    from sglang.lang.chat_template import get_chat_template

    from sglang_entropy.tools.client import EntropyEndpoint

    program = runpy.run_path("examples/deepconf_vote.py")
    backend = EntropyEndpoint(entropy_server.url)
    backend.chat_template = get_chat_template("chatml")
    sgl.set_default_backend(backend)
    result, traces = program["answer"]("What is 3 + 4?", budget=6, warmup=2, window=WINDOW, max_tokens=32)
    groups = [t["meta_info"]["entropy"]["group"] for t in traces]
    assert sorted(g["role"] for g in groups) == ["calibrated"] * 4 + ["warmup"] * 2
    assert len({g["id"] for g in groups}) == 1
    expected = vote(traces_from_outputs(traces), window=WINDOW)
    assert result == expected and result.voters > 0
