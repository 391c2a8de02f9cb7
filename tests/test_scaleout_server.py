"""End to end: the adapter under SGLang's own scale-out on the CPU platform. With several
tokenizer workers the HTTP side runs in every worker (the adapter's app); named groups, which
meet in one HTTP process, are refused there; with several data-parallel ranks a budget group's
requests are pinned to one rank, where its budget is kept. The project's launcher sets the CPU
details (core binding per rank, tokenizer workers' start-up time)."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from sglang_entropy.tools import server as sglang_server

pytestmark = pytest.mark.server
# Beside the session's servers on a small machine: a small KV pool (the launcher's default takes 3 GB a scheduler)
SMALL_KV = ["--max-total-tokens", "16384"]


def generate(server, entropy, text="What is 3 + 4?", **sampling):
    sampling_params = {"max_new_tokens": 8, "temperature": 0.7, **sampling, "custom_params": {"entropy": entropy}}
    return requests.post(f"{server.url}/generate", json={"text": text, "sampling_params": sampling_params}, timeout=600)


@pytest.fixture(scope="module")
def two_tokenizer_workers(model_path):
    args = ["--tokenizer-worker-num", "2", "--entropy-policies", "deepconf,eager", *SMALL_KV]
    with sglang_server.launch(model_path, extra_args=args) as server:
        yield server


def test_every_tokenizer_worker_serves_the_adapter(two_tokenizer_workers):
    server = two_tokenizer_workers
    with ThreadPoolExecutor(4) as pool:  # enough requests that both workers answer some
        outputs = list(pool.map(lambda _: generate(server, {"return_signals": ["entropy"]}, ignore_eos=True), range(8)))
    for response in outputs:
        meta = response.json()["meta_info"]
        assert len(meta["entropy"]["signals"]["entropy"]) == 8
        assert not any(key.startswith("entropy.") for key in meta)  # no raw keys leak
    for _ in range(4):
        assert generate(server, {"policy": "no-such-policy"}).status_code == 400
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    completion = client.completions.create(
        model="default",
        prompt="Hi",
        max_tokens=4,
        extra_body={"custom_params": {"entropy": {"return_signals": ["margin"]}}},
    )
    assert len(completion.metadata["entropy"][0]["signals"]["margin"]) == completion.usage.completion_tokens


def test_branches_and_groups_of_one_request_work_across_workers(two_tokenizer_workers):
    server = two_tokenizer_workers
    for _ in range(3):
        eager = {"policy": "eager", "params": {"threshold": 0.0, "max_sequences": 3}}
        sequences = generate(server, eager, ignore_eos=True).json()
        assert len(sequences) == 3  # every forked child was collected by the worker that asked
    group = generate(server, {"policy": "deepconf", "params": {"warmup_traces": 2}}, n=4, max_new_tokens=12).json()
    roles = sorted(o["meta_info"]["entropy"]["group"]["role"] for o in group)
    assert roles == ["calibrated", "calibrated", "warmup", "warmup"]


def test_named_groups_are_refused_with_several_workers(two_tokenizer_workers):
    response = generate(two_tokenizer_workers, {"policy": "deepconf", "params": {"group_id": uuid.uuid4().hex}})
    assert response.status_code == 400
    assert "--tokenizer-worker-num" in response.json()["error"]["message"]
