"""End to end: the adapter with tensor parallelism (``--tp-size 2``) on the CPU platform, on a
tiny random Llama whose 4 query and 2 KV heads split over two ranks (SmolLM2's 9 / 3 do not).

Every TP rank runs the scheduler, the sampler and the adapter's step on the same all-gathered
logits; the adapter all-reduces each step's packed results over the TP group, so every rank
stops, forks and records on the same values (SGLang's sampled tokens agree the same way when
``SYNC_TOKEN_IDS_ACROSS_TP`` is set, which the launcher sets for TP > 1). A rank that acted
differently would fork a child the other ranks lack, and the next collective would hang: so
each test below also proves the ranks agreed, by finishing and leaving every rank idle.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sglang_entropy.testing import entropy_state, used_tokens
from sglang_entropy.tools import server as sglang_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def tiny_model(model_path, tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer: 4 query heads, 2 KV heads."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tp_server(tiny_model):
    args = ["--tp-size", "2", "--max-total-tokens", "8192", "--entropy-policies", "deepconf,eager"]
    with sglang_server.launch(tiny_model, extra_args=args) as server:
        yield server


def generate(server, entropy, text="What is 3 + 4?", **sampling):
    sampling_params = {"max_new_tokens": 12, "temperature": 0.7, **sampling, "custom_params": {"entropy": entropy}}
    response = requests.post(
        f"{server.url}/generate", json={"text": text, "sampling_params": sampling_params}, timeout=600
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_idle(server):
    assert used_tokens(server) == 0
    state = entropy_state(server)
    assert state["tracked_requests"] == 0 and state["budget_pools_in_use"] == 0


def test_signals_and_a_deepconf_stop_under_tensor_parallelism(tp_server):
    out = generate(tp_server, {"return_signals": ["entropy", "confidence"]}, temperature=0, ignore_eos=True)
    signals = out["meta_info"]["entropy"]["signals"]
    assert len(signals["entropy"]) == len(signals["confidence"]) == 12
    # a threshold above every window mean stops at the first full window (8 tokens), on every rank
    stopped = generate(tp_server, {"policy": "deepconf", "params": {"threshold": 1e5, "window_size": 8}})
    finish = stopped["meta_info"]["finish_reason"]
    assert finish["entropy_policy"] == "deepconf" and finish["token_index"] == 7
    group = generate(tp_server, {"policy": "deepconf", "params": {"warmup_traces": 2}}, n=4)
    assert sorted(o["meta_info"]["entropy"]["group"]["role"] for o in group) == ["calibrated"] * 2 + ["warmup"] * 2
    assert_idle(tp_server)


def test_eager_forks_and_a_budget_group_under_tensor_parallelism(tp_server):
    for _ in range(3):
        sequences = generate(tp_server, {"policy": "eager", "params": {"threshold": 0.0, "max_sequences": 3}})
        assert len(sequences) == 3
        by_id = {s["meta_info"]["id"]: s for s in sequences}
        for sequence in sequences:
            about = sequence["meta_info"]["entropy"]["sequence"]
            if about["parent"] is not None:  # the child resumes from the parent's checkpoint
                parent = by_id[about["parent"]]["meta_info"]
                expected = parent["prompt_tokens"] + about["branch_token_index"]
                assert sequence["meta_info"]["prompt_tokens"] == expected
    params = {"threshold": 0.0, "max_sequences": 3, "budget_group": "tp", "budget": 3}
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda text: generate(tp_server, {"policy": "eager", "params": params}, text=text, ignore_eos=True),
                ["What is 3 + 4?", "Name a colour."],
            )
        )
    assert sum(len(a) for a in answers) == 3
    assert_idle(tp_server)
