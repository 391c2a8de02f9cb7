"""End to end: SGLang's real STANDALONE speculative decoding (draft model + target verify, chain
drafts) on the portable CPU platform, with SmolLM2-135M-Instruct drafting for itself.

Greedy decoding must not change under speculation: the committed tokens are the target's
argmax at every verified position. In float32 the verify attention computes each row exactly as
a decode step does (tests/test_spec_attention.py), so the texts must be identical.
"""

import pytest
import requests

from sglang_entropy.tools import server as sglang_server

pytestmark = pytest.mark.server

QUESTIONS = [
    "What is 7 times 8?",
    "Write a short poem about autumn leaves.",
    "Explain what a prime number is.",
]
MAX_NEW_TOKENS = 48
COMMON_ARGS = ["--page-size", "1", "--dtype", "float32", "--max-total-tokens", "8192"]
SPEC_STEPS = 3


def generate(server, prompts, temperature=0):
    body = {"text": prompts, "sampling_params": {"temperature": temperature, "max_new_tokens": MAX_NEW_TOKENS}}
    return requests.post(f"{server.url}/generate", json=body, timeout=900)


def greedy(model_path, prompts, extra_args, sampled=None):
    """Launch a server, generate greedily for all prompts in one batch, stop it. ``sampled``:
    first send the prompts with temperature 0.7 and keep that response here."""
    with sglang_server.launch(model_path, enable_entropy=False, extra_args=COMMON_ARGS + extra_args) as server:
        if sampled is not None:
            sampled.append(generate(server, prompts[:1], temperature=0.7))
        response = generate(server, prompts)
        assert response.status_code == 200, f"{response.status_code}: {response.text}\n{server.log_tail()}"
        return response.json()


@pytest.fixture(scope="module")
def outputs(model_path, tokenizer):
    if sglang_server.has_gpu():
        pytest.skip("checks the portable CPU platform's speculative path")
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    # One server at a time: on a small CPU machine two would compete for the same cores.
    plain = greedy(model_path, prompts, [])
    sampled = []
    spec = greedy(model_path, prompts, sglang_server.standalone_args(model_path, SPEC_STEPS), sampled)
    return plain, spec, sampled[0]


def test_speculative_greedy_output_equals_plain_decoding(outputs):
    plain, spec, _ = outputs
    for p, s in zip(plain, spec, strict=True):
        assert s["meta_info"]["completion_tokens"] == p["meta_info"]["completion_tokens"]
        assert s["output_ids"] == p["output_ids"]
        assert s["text"] == p["text"]


def test_the_draft_model_gets_tokens_accepted(outputs):
    _, spec, _ = outputs
    for output in spec:
        meta = output["meta_info"]
        # spec_accept_length = completion_tokens / verify steps; the first token comes from the
        # prefill, so it exceeds 1 a little even when no draft is accepted: count the drafts too.
        assert meta["spec_accept_length"] > 1, meta
        assert meta["spec_num_correct_drafts"] > 0, meta
        # A verify step commits at most its accepted drafts plus one target token.
        assert meta["completion_tokens"] <= 1 + meta["spec_verify_ct"] + meta["spec_num_correct_drafts"], meta


def test_a_sampled_request_fails_alone_with_the_cause(outputs):
    # Verification is greedy only on this platform; a sampled request used to crash the
    # scheduler (SGLang's sampling verify calls CUDA kernels). The greedy batch after it ran
    # on the same server (the fixture asserts its 200).
    _, _, sampled = outputs
    assert sampled.status_code == 400, sampled.text
    message = sampled.json()["error"]["message"]
    assert "verifies greedily only" in message and "temperature=0.7" in message, message
