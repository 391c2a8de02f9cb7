"""End to end: the real SGLang server (CPU platform or GPU) with SmolLM2-135M-Instruct."""

import json
import math
import subprocess
import sys
import threading

import numpy as np
import openai
import pytest
import requests

from sglang_entropy.testing import reference

pytestmark = pytest.mark.server

QUESTIONS = [
    "What is 7 times 8?",
    "Write a short poem about autumn leaves.",
    "Explain what a prime number is.",
    "List three animals that live in the ocean.",
]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]


def generate(server, text, entropy=None, stream=False, **sampling):
    sampling_params = {"max_new_tokens": 32, **sampling}
    if entropy is not None:
        sampling_params["custom_params"] = {"entropy": entropy}
    body = {"text": text, "sampling_params": sampling_params, "stream": stream}
    return requests.post(f"{server.url}/generate", json=body, timeout=600, stream=stream)


def test_confidence_equals_sglang_top20_logprobs(entropy_server, prompts, tokenizer):
    body = {
        "text": prompts,
        "return_logprob": True,
        "top_logprobs_num": 20,
        "sampling_params": {
            "max_new_tokens": 24,
            "temperature": 1.0,
            "custom_params": {"entropy": {"return_signals": ["confidence", "entropy", "topk_entropy", "margin"]}},
        },
    }
    outputs = requests.post(f"{entropy_server.url}/generate", json=body, timeout=600).json()
    log_vocab = math.log(len(tokenizer))
    for output in outputs:
        meta = output["meta_info"]
        signals = meta["entropy"]["signals"]
        expected = [-np.mean([lp for lp, _, _ in top]) for top in meta["output_top_logprobs"]]
        assert len(signals["confidence"]) == len(expected) == meta["completion_tokens"]
        np.testing.assert_allclose(signals["confidence"], expected, rtol=1e-3)
        assert all(0 <= h <= log_vocab + 1e-4 for h in signals["entropy"])
        # margin from the same top logprobs
        np.testing.assert_allclose(
            signals["margin"], [top[0][0] - top[1][0] for top in meta["output_top_logprobs"]], rtol=1e-3, atol=1e-3
        )


def greedy_ids(server, prompts, entropy):
    # Same cache state for every arm: a prefix served from SGLang's radix cache goes through
    # another attention path, whose rounding can flip a near-tie greedy token on its own.
    requests.post(f"{server.url}/flush_cache", timeout=60).raise_for_status()
    return [o["output_ids"] for o in generate(server, prompts, entropy, temperature=0).json()]


def test_asking_for_signals_does_not_change_greedy_output(entropy_server, plain_server, prompts):
    entropy = {"return_signals": ["entropy", "confidence", "group_confidence", "varentropy"]}
    with_signals = greedy_ids(entropy_server, prompts, entropy)
    without = greedy_ids(entropy_server, prompts, None)
    adapter_disabled = greedy_ids(plain_server, prompts, None)
    assert with_signals == without == adapter_disabled


def test_server_without_the_flag_ignores_entropy_options(plain_server, prompts):
    output = generate(plain_server, prompts[0], {"return_signals": ["entropy"]}, temperature=0).json()
    assert "entropy" not in output["meta_info"]
    assert output["meta_info"]["completion_tokens"] > 0


BAD_REQUESTS = [
    ({"policy": "no-such-policy"}, "custom_params.entropy.policy"),
    ({"policy": "deepconf", "params": {"threshold": "high"}}, "custom_params.entropy.params.threshold"),
    ({"policy": "deepconf", "params": {"threshold": 1, "window_size": 0}}, "custom_params.entropy.params.window_size"),
    ({"return_signals": ["perplexity"]}, "custom_params.entropy.return_signals"),
    ({"policy": "deepconf", "code": "__import__('os')"}, "custom_params.entropy.code"),
]


def test_bad_requests_get_400_while_a_valid_request_completes(entropy_server, prompts):
    valid = {}

    def run_valid():
        valid["response"] = generate(
            entropy_server,
            prompts[1],
            {"return_signals": ["entropy"]},
            temperature=0.7,
            max_new_tokens=64,
            ignore_eos=True,
        )

    thread = threading.Thread(target=run_valid)
    thread.start()
    for entropy, field in BAD_REQUESTS:
        for stream in (False, True):
            response = generate(entropy_server, prompts[0], entropy, stream=stream)
            assert response.status_code == 400, (entropy, response.text)
            assert field in response.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{entropy_server.url}/v1", api_key="none")
    with pytest.raises(openai.BadRequestError, match="custom_params.entropy.params.threshold"):
        client.completions.create(
            model="default",
            prompt="Hi",
            max_tokens=4,
            extra_body={"custom_params": {"entropy": {"policy": "deepconf", "params": {"threshold": None}}}},
        )
    thread.join()
    response = valid["response"]
    assert response.status_code == 200
    output = response.json()
    assert output["meta_info"]["completion_tokens"] == 64
    assert len(output["meta_info"]["entropy"]["signals"]["entropy"]) == 64


def test_stream_chunks_carry_the_new_tokens_values(entropy_server, prompts):
    entropy = {"return_signals": ["entropy", "confidence"]}
    whole = generate(entropy_server, prompts[2], entropy, temperature=0).json()
    response = generate(entropy_server, prompts[2], entropy, stream=True, temperature=0)
    streamed = {"entropy": [], "confidence": []}
    chunks = 0
    for line in response.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for name, values in chunk["meta_info"]["entropy"]["signals"].items():
            streamed[name] += values
        chunks += 1
    assert chunks > 1
    for name in streamed:
        assert streamed[name] == pytest.approx(whole["meta_info"]["entropy"]["signals"][name], rel=1e-6)


def test_openai_endpoints_take_extra_body_and_return_signals(entropy_server):
    client = openai.OpenAI(base_url=f"{entropy_server.url}/v1", api_key="none")
    extra = {"custom_params": {"entropy": {"return_signals": ["entropy", "varentropy"]}}}
    completion = client.completions.create(
        model="default", prompt="The sea is", max_tokens=12, temperature=0, extra_body=extra
    )
    [info] = completion.metadata["entropy"]
    assert len(info["signals"]["varentropy"]) == completion.usage.completion_tokens
    chat = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
        extra_body=extra,
    )
    [info] = chat.metadata["entropy"]
    assert len(info["signals"]["entropy"]) == chat.usage.completion_tokens


def test_openai_streams_carry_each_chunks_new_values(entropy_server):
    client = openai.OpenAI(base_url=f"{entropy_server.url}/v1", api_key="none")
    extra = {"custom_params": {"entropy": {"return_signals": ["entropy", "confidence"]}}}
    request = {"model": "default", "prompt": "Rivers flow", "max_tokens": 16, "temperature": 0, "extra_body": extra}
    expected = client.completions.create(**request).metadata["entropy"][0]["signals"]
    streamed = {"entropy": [], "confidence": []}
    for chunk in client.completions.create(**request, stream=True):
        for entry in (chunk.model_extra.get("metadata") or {}).get("entropy", []):
            for name in streamed:
                streamed[name] += entry["signals"][name]
    for name in streamed:
        assert streamed[name] == pytest.approx(expected[name], rel=1e-6)

    chat_values = []
    for chunk in client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
        extra_body=extra,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for entry in (chunk.model_extra.get("metadata") or {}).get("entropy", []):
            chat_values += entry["signals"]["entropy"]
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
    assert len(chat_values) == completion_tokens


@pytest.mark.parametrize("threshold", [4.0, 5.0, 6.0])
def test_deepconf_stops_exactly_at_the_first_crossing(entropy_server, prompts, threshold):
    """The config file sets deepconf's window to 8 tokens; the test recomputes every window
    mean from the returned confidences."""
    window = 8
    entropy = {
        "policy": "deepconf",
        "params": {"threshold": threshold},
        "return_signals": ["confidence", "group_confidence"],
    }
    outputs = generate(entropy_server, prompts * 2, entropy, temperature=1.0, max_new_tokens=48).json()
    stopped = 0
    for output in outputs:
        meta = output["meta_info"]
        confidence = meta["entropy"]["signals"]["confidence"]
        means = reference.window_means(confidence, window)
        np.testing.assert_allclose(meta["entropy"]["signals"]["group_confidence"], means, rtol=1e-4)
        crossings = [i for i in range(window - 1, len(means)) if means[i] < threshold]
        stops = [e for e in meta["entropy"]["events"] if e["kind"] == "stop"]
        if crossings:
            first = crossings[0]
            assert first == len(confidence) - 1, "the trace must end on its first crossing"
            assert stops == [
                {
                    "kind": "stop",
                    "token_index": first,
                    "policy": "deepconf",
                    "reason": "low_group_confidence",
                    "group_confidence": pytest.approx(means[first], rel=1e-4),
                    "threshold": threshold,
                }
            ]
            assert meta["finish_reason"]["entropy_policy"] == "deepconf"
            assert meta["completion_tokens"] == first + 1
            stopped += 1
        else:
            assert stops == []
            assert meta["finish_reason"]["type"] in ("length", "stop") and "entropy_policy" not in meta["finish_reason"]
    if threshold == 6.0:
        assert stopped > 0


def test_launch_flags_are_documented():
    help_text = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True, timeout=300
    ).stdout
    for flag in ("--enable-entropy", "--entropy-policies", "--entropy-config"):
        assert flag in help_text


def test_the_launch_logs_no_hook_error(entropy_server):
    log = entropy_server.log_path.read_text(errors="replace")
    assert "Failed to apply hooks" not in log and "Failed to execute general plugin" not in log, log[:4000]
