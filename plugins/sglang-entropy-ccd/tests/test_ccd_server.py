"""CCD on the real SGLang server (CPU platform) with the small addition diffusion model."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml
from ccd_reference import check_trace
from sglang_entropy_ccd.model import addition_problem, ensure_model

from sglang_entropy.testing import delta, generate, scrape
from sglang_entropy.tools import server as sglang_server

pytestmark = pytest.mark.server

BLOCK = 8
MAX_STEPS = BLOCK + 1  # SGLang's DllmAlgorithm.max_steps
CCD_CONFIG = {"block_size": BLOCK, "early_exit": "cosine"}


@pytest.fixture(scope="session")
def dllm_model():
    return ensure_model()  # trained on first use (about 15 min on 2 cores), then cached


def _launch(model, algorithm, config, tmp_path_factory, extra=()):
    path = tmp_path_factory.mktemp("dllm") / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--dllm-algorithm", algorithm, "--dllm-algorithm-config", str(path), "--max-total-tokens", "8192", *extra]
    return sglang_server.launch(model, enable_entropy=True, extra_args=args)


@pytest.fixture(scope="module")
def ccd_server(dllm_model, tmp_path_factory):
    extra = ["--max-running-requests", "4", "--enable-metrics"]
    with _launch(dllm_model, "CCD", CCD_CONFIG, tmp_path_factory, extra) as server:
        yield server


@pytest.fixture(scope="module")
def lowconfidence_server(dllm_model, tmp_path_factory):
    with _launch(dllm_model, "LowConfidence", {"block_size": BLOCK}, tmp_path_factory) as server:
        yield server


def _generate(url, prompt, trace=False):
    return generate(url, prompt, {"dllm_trace": True} if trace else None, timeout=300, max_new_tokens=16, temperature=0)


def _problems(seed, count):
    rng = random.Random(seed)
    return [addition_problem(rng, 999) for _ in range(count)]


def test_committed_positions_obey_the_rule_and_answers_are_right(ccd_server):
    problems = _problems(3, 24)
    with ThreadPoolExecutor(4) as pool:  # blocks of different requests share batches, at different steps
        outputs = list(pool.map(lambda p: _generate(ccd_server.url, p[0], trace=True), problems))
    correct = 0
    for (_, answer), out in zip(problems, outputs, strict=True):
        entropy = out["meta_info"]["entropy"]
        blocks = [e for e in entropy["events"] if e["kind"] == "block"]
        assert blocks and entropy["policy"] == "ccd"
        assert entropy["nfe"] == sum(b["nfe"] + b.get("prompt_nfe", 0) for b in blocks)
        for block in blocks:
            trace = block["trace"]
            check_trace(trace, CCD_CONFIG, BLOCK, MAX_STEPS)
            assert block["nfe"] == len(trace)  # one decision per forward of the block
            offset = BLOCK - block["tokens"]  # the prompt's tail comes first in a request's first block
            tokens = out["output_ids"][block["start"] : block["start"] + block["tokens"]]
            for j, committed_at in enumerate(block["commit_steps"]):
                assert trace[committed_at]["commit"][offset + j]
                assert not any(step["commit"][offset + j] for step in trace[:committed_at])
                if j < len(tokens):  # SGLang drops what follows the first EOS
                    assert tokens[j] == trace[committed_at]["predicted"][offset + j]
            exits = [t for t, step in enumerate(trace) if step.get("tau") is not None and step["margin"] >= step["tau"]]
            assert block["exit_step"] == (exits[0] if exits else None)
        correct += out["text"].strip() == answer
    assert correct / len(problems) >= 0.8, f"{correct}/{len(problems)} right"


def test_ccd_uses_fewer_forwards_than_lowconfidence_on_the_same_prompts(ccd_server, lowconfidence_server):
    problems = _problems(5, 30)
    totals, right = {}, {}
    for name, url in (("ccd", ccd_server.url), ("lowconfidence", lowconfidence_server.url)):
        outputs = [_generate(url, prompt) for prompt, _ in problems]
        for out in outputs:
            blocks = [e for e in out["meta_info"]["entropy"]["events"] if e["kind"] == "block"]
            assert blocks and all("trace" not in b for b in blocks)  # the trace only when asked for
        totals[name] = sum(out["meta_info"]["entropy"]["nfe"] for out in outputs)
        right[name] = sum(out["text"].strip() == answer for out, (_, answer) in zip(outputs, problems, strict=True))
    assert totals["ccd"] < totals["lowconfidence"], totals
    # both answer most problems right; what the early exit costs in accuracy is measured by the bench
    assert min(right.values()) >= 0.8 * len(problems), right


def test_nfe_reaches_openai_clients(ccd_server):
    body = {"model": "default", "prompt": "45+67=", "max_tokens": 16, "temperature": 0}
    response = requests.post(f"{ccd_server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["choices"][0]["text"].strip() == "112"
    assert completion["metadata"]["entropy"][0]["nfe"] >= 2


def test_forwards_per_block_metric_equals_the_block_events(ccd_server):
    before = scrape(ccd_server.url)
    outputs = [_generate(ccd_server.url, f"{a}+{b}=") for a, b in ((12, 7), (305, 498), (9, 990))]
    after = scrape(ccd_server.url)
    blocks = [e for o in outputs for e in o["meta_info"]["entropy"]["events"] if e["kind"] == "block"]
    assert blocks
    assert delta(before, after, "sglang:entropy_dllm_forwards_per_block_count") == len(blocks)
    assert delta(before, after, "sglang:entropy_dllm_forwards_per_block_sum") == sum(e["nfe"] for e in blocks)


def test_selecting_ccd_per_request_is_a_clear_400(ccd_server):
    body = {"text": "1+2=", "sampling_params": {"custom_params": {"entropy": {"policy": "ccd"}}}}
    response = requests.post(f"{ccd_server.url}/generate", json=body, timeout=60)
    assert response.status_code == 400
    assert "--dllm-algorithm CCD" in response.text
    assert _generate(ccd_server.url, "1+2=")["text"].strip() == "3"  # the server goes on


def test_what_a_diffusion_server_cannot_give_is_a_clear_400(ccd_server):
    """No per-token signals and no decode-step policies on a diffusion LM: refused, naming the
    field, natively and over OpenAI (SGLang runs no sampling observer there)."""
    for entropy, field in (
        ({"return_signals": ["entropy"]}, "custom_params.entropy.return_signals"),
        ({"policy": "deepconf", "params": {"threshold": 1.0}}, "custom_params.entropy.policy"),
    ):
        body = {"text": "1+2=", "sampling_params": {"max_new_tokens": 4, "custom_params": {"entropy": entropy}}}
        response = requests.post(f"{ccd_server.url}/generate", json=body, timeout=60)
        assert response.status_code == 400 and field in response.text and "--dllm-algorithm CCD" in response.text
        body = {"model": "default", "prompt": "1+2=", "max_tokens": 4, "custom_params": {"entropy": entropy}}
        response = requests.post(f"{ccd_server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 400 and field in response.text


def test_per_request_parameters_change_only_their_own_rows(ccd_server):
    """One batch mixing settings: each request's blocks follow the rule with its own parameters
    over the launch's, re-checked from its trace; the others run with the launch's."""
    settings = [None, {"budget": 2, "adaptive": False, "early_exit": "none"}, {"budget": 3, "warmup_steps": 0}]
    problems = _problems(11, 12)

    def run(i):
        params = settings[i % len(settings)]
        entropy = {"dllm_trace": True, **({"params": params} if params else {})}
        body = {"text": problems[i][0], "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
        body["sampling_params"]["custom_params"] = {"entropy": entropy}
        response = requests.post(f"{ccd_server.url}/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return params, response.json()

    with ThreadPoolExecutor(4) as pool:  # requests of all three settings share batches
        results = list(pool.map(run, range(len(problems))))
    for params, out in results:
        effective = {**CCD_CONFIG, **(params or {})}
        for block in [e for e in out["meta_info"]["entropy"]["events"] if e["kind"] == "block"]:
            check_trace(block["trace"], effective, BLOCK, MAX_STEPS)
            assert all(step["budget"] == effective.get("budget", 1) for step in block["trace"])
            if effective["early_exit"] == "none":
                assert block["exit_step"] is None and all(step["tau"] is None for step in block["trace"])


def test_per_request_parameters_are_validated(ccd_server):
    for params, field in (
        ({"budget": 0}, "params.budget"),
        ({"no_such": 1}, "params.no_such"),
        ({"early_exit": "sigmoid"}, "params.early_exit"),
        ({"exit_tau_high": "NaN"}, "params.exit_tau_high"),
    ):
        body = {"text": "1+2=", "sampling_params": {"custom_params": {"entropy": {"params": params}}}}
        response = requests.post(f"{ccd_server.url}/generate", json=body, timeout=60)
        assert response.status_code == 400 and f"custom_params.entropy.{field}" in response.text, response.text
    # each value alone is valid, together they are not: the scheduler aborts the request with a 400
    body = {"text": "1+2=", "sampling_params": {"custom_params": {"entropy": {"params": {"exit_tau_low": 9.0}}}}}
    response = requests.post(f"{ccd_server.url}/generate", json=body, timeout=60)
    assert response.status_code == 400 and "exit_tau_low must not exceed exit_tau_high" in response.text


def test_synchronous_schedule_gives_the_same_answers_and_follows_the_rule(dllm_model, ccd_server, tmp_path_factory):
    """``--no-dllm-fdfo``: SGLang denoises each batch of blocks to the end in one call."""
    problems = _problems(11, 8)
    with _launch(dllm_model, "CCD", CCD_CONFIG, tmp_path_factory, ["--no-dllm-fdfo"]) as sync_server:
        outputs = [_generate(sync_server.url, prompt, trace=True) for prompt, _ in problems]
    for (prompt, _), out in zip(problems, outputs, strict=True):
        for block in out["meta_info"]["entropy"]["events"]:
            check_trace(block["trace"], CCD_CONFIG, BLOCK, MAX_STEPS)
            assert block["nfe"] == len(block["trace"])
        assert out["output_ids"] == _generate(ccd_server.url, prompt)["output_ids"]
