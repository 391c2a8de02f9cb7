"""The CCD policy and the adapter's dLLM algorithm, without a server."""

from types import SimpleNamespace

import pytest
import torch
from ccd_reference import check_trace, threshold
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sglang_entropy_ccd import policy as ccd

from sglang_entropy.adapter.scheduler import dllm
from sglang_entropy.types import DenoiseStep, param_rows

MASK = 99


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
@given(high=st.floats(0, 20), drop=st.floats(0, 20))
def test_exit_schedules_fall_from_high_to_low(schedule, high, drop):
    params = ccd.CCDParams(early_exit=schedule, exit_tau_high=high, exit_tau_low=high - drop)
    progress = torch.linspace(0, 1, 11)
    tau = ccd.exit_threshold(param_rows([params] * len(progress), "cpu"), progress)
    assert torch.all(tau[1:] <= tau[:-1] + 1e-4)
    assert tau[0].item() == pytest.approx(high, abs=1e-4)
    if schedule != "exponential":  # the exponential approaches tau_low but only reaches it at rate -> inf
        assert tau[-1].item() == pytest.approx(high - drop, abs=1e-4)
    for p, value in zip(progress.tolist(), tau.tolist(), strict=True):
        assert value == pytest.approx(threshold(schedule, high, high - drop, params.exit_rate, p), rel=1e-4, abs=1e-3)


def test_params_are_validated():
    with pytest.raises(ValidationError, match="exit_tau_low"):
        ccd.CCDParams(exit_tau_high=1.0, exit_tau_low=2.0)
    with pytest.raises(ValidationError, match="extra"):
        ccd.CCDParams(budgett=2)
    with pytest.raises(ValidationError):
        ccd.CCDParams(early_exit="sigmoid")


def _denoise(params: ccd.CCDParams, logits_per_step: torch.Tensor, masked: torch.Tensor, steps: torch.Tensor):
    """Run the policy over [S, B, L, V] logits; returns the commit mask of every step."""
    batch, block = masked.shape
    state = ccd.CCD().denoise_start(batch, block, params, "cpu")
    canvas, commits, traces = masked.clone(), [], []
    for logits in logits_per_step:
        step = DenoiseStep(logits, masked.clone(), canvas, steps.clone(), block + 1, params, state)
        decision = ccd.CCD().unmask_step(step)
        commit = (decision.commit | decision.exit[:, None]) & masked
        commit = dllm._ensure_progress(commit, masked, logits)
        commits.append(commit)
        traces.append({**decision.trace, "masked": masked.clone(), "commit": commit, "predicted": logits.argmax(-1)})
        masked = masked & ~commit
        steps += 1
    return commits, traces


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    budget=st.integers(1, 3),
    warmup=st.integers(0, 3),
    schedule=st.sampled_from(["none", "linear", "cosine", "exponential"]),
    sharpness=st.floats(0.5, 6.0),
)
def test_unmask_step_matches_the_reference(seed, budget, warmup, schedule, sharpness):
    """Random logit sequences, where predictions often repeat so that matches happen; every
    row's commits equal the plain-Python rule's."""
    generator = torch.Generator().manual_seed(seed)
    batch, block, vocab, steps = 3, 8, 6, 9
    base = torch.randn(batch, block, vocab, generator=generator) * sharpness
    noise = torch.randn(steps, batch, block, vocab, generator=generator)
    logits_per_step = base + noise
    masked = torch.rand(batch, block, generator=generator) < 0.9
    masked[:, -1] = True
    raw = {"budget": budget, "warmup_steps": warmup, "early_exit": schedule, "exit_tau_high": 6.0, "exit_tau_low": 2.0}
    params = ccd.CCDParams(**raw)
    commits, traces = _denoise(params, logits_per_step, masked, torch.zeros(batch, dtype=torch.int64))
    for row in range(batch):
        row_trace = [{k: v[row].tolist() for k, v in step.items()} for step in traces]
        check_trace(row_trace, raw, block, block + 1)


def test_rows_at_different_steps_follow_their_own_progress():
    """First-done-first-out batches mix blocks at different steps: warm-up and exit use each row's."""
    params = ccd.CCDParams(budget=1, warmup_steps=2, early_exit="linear", exit_tau_high=100.0, exit_tau_low=0.0)
    logits = torch.zeros(2, 4, 3)
    logits[..., 0] = 1.0  # margin 1 everywhere
    masked = torch.ones(2, 4, dtype=torch.bool)
    state = ccd.CCD().denoise_start(2, 4, params, "cpu")
    steps = torch.tensor([0, 5])  # tau(0) = 100, tau(5/5) = 0
    decision = ccd.CCD().unmask_step(DenoiseStep(logits, masked, masked, steps, 5, params, state))
    assert decision.exit.tolist() == [False, True]


def test_the_check_catches_a_mutated_rule():
    """A policy that never takes the adaptive branch (always the budget) fails the check."""
    caught = 0
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(3, 8, 6, generator=generator) * 4 + torch.randn(9, 3, 8, 6, generator=generator)
        masked = torch.ones(3, 8, dtype=torch.bool)
        mutated = ccd.CCDParams(adaptive=False, warmup_steps=0)
        _, traces = _denoise(mutated, logits, masked, torch.zeros(3, dtype=torch.int64))
        for row in range(3):
            try:
                check_trace([{k: v[row].tolist() for k, v in t.items()} for t in traces], {"warmup_steps": 0}, 8, 9)
            except AssertionError:
                caught += 1
    assert caught > 0


# --- the SGLang algorithm the adapter registers ------------------------------------------------


def _algorithm(config: dict, block_size=4):
    from sglang.srt.dllm.config import DllmConfig

    cls = dllm.get_algorithm_cls(lambda name: pytest.fail(f"fell through to SGLang for {name}"), "CCD")
    return cls(DllmConfig("CCD", config, block_size=block_size, mask_id=MASK, max_running_requests=4))


def test_ccd_is_registered_for_sglang_and_others_fall_through():
    from sglang.srt.dllm.algorithm.base import DllmAlgorithm

    algorithm = _algorithm({"budget": 2, "early_exit": "cosine"})
    assert isinstance(algorithm, DllmAlgorithm) and type(algorithm).__name__ == "CCD"
    assert algorithm.params.budget == 2
    assert dllm.get_algorithm_cls(lambda name: f"sglang's {name}", "LowConfidence") == "sglang's LowConfidence"


def test_bad_algorithm_config_is_a_clear_launch_error():
    with pytest.raises(ValueError, match=r"--dllm-algorithm-config for CCD \(ccd\): config.budget"):
        _algorithm({"budget": 0})
    with pytest.raises(ValueError, match="exit_tau_low"):
        _algorithm({"exit_tau_high": 1, "exit_tau_low": 3})


def test_algorithm_step_fills_blocks_in_sglang_fdfo_style():
    """Per-row block states survive between calls (SGLang carries them), rows join fresh."""
    algorithm = _algorithm({"budget": 1, "warmup_steps": 0})
    algorithm.trace_rows = [True, False]
    block, vocab = 4, MASK + 1
    input_ids = torch.full((2 * block,), MASK)
    input_ids[0] = 7  # row 0's block starts with a prompt token
    batch = SimpleNamespace(batch_size=2, input_ids=input_ids, dllm_prompt_mask=None)
    logits = torch.zeros(2 * block, vocab)
    logits[:, 11] = torch.linspace(5, 1, 2 * block)  # every position predicts token 11
    states = algorithm.init_step_state(batch)
    steps_taken = 0
    while True:
        done = algorithm.step(batch, logits, states)
        steps_taken += 1
        if all(done):
            break
    assert input_ids.view(2, block)[0].tolist() == [7, 11, 11, 11]
    assert input_ids.view(2, block)[1].tolist() == [11] * block
    assert int(states[0].steps) == steps_taken and len(states[0].trace) == steps_taken
    assert states[1].trace == []  # no trace asked for that row
    report = states[0].report(new_tokens=3)
    assert sorted(report["commit_steps"]) == report["commit_steps"] and -1 not in report["commit_steps"]
    check_trace(report["trace"], {"budget": 1, "warmup_steps": 0}, block, block + 1)


def test_a_failing_policy_finishes_the_block_and_is_reported():
    algorithm = _algorithm({})
    input_ids = torch.full((4,), MASK)
    batch = SimpleNamespace(batch_size=1, input_ids=input_ids, dllm_prompt_mask=None)
    states = algorithm.init_step_state(batch)

    def broken(step):
        raise ZeroDivisionError("boom")

    algorithm.registry = SimpleNamespace(policy=lambda name: SimpleNamespace(unmask_step=broken))
    logits = torch.randn(4, MASK + 1, generator=torch.Generator().manual_seed(0))
    logits[:, MASK] = -torch.inf  # a model never predicts the mask token
    algorithm.step(batch, logits, states)
    assert MASK not in input_ids.tolist()
    assert isinstance(algorithm.failure, ZeroDivisionError)


def test_a_request_cannot_select_a_diffusion_policy_per_request():
    from sglang_entropy.registry import installed_policies
    from sglang_entropy.settings import EntropyRequestError, ServerSettings

    settings_ = ServerSettings(enabled=True, allowed_policies=None, config=ServerSettings.from_env({}).config)
    with pytest.raises(EntropyRequestError, match="--dllm-algorithm CCD"):
        settings_.resolve({"entropy": {"policy": "ccd"}}, installed_policies())
    assert settings_.resolve({"entropy": {"dllm_trace": True}}, installed_policies()) is not None
    with pytest.raises(EntropyRequestError, match="dllm_trace"):
        settings_.resolve({"entropy": {"dllm_trace": "all of it"}}, installed_policies())


def test_block_events_count_forwards_across_first_done_first_out_calls():
    """A prompt-only block, then a block denoised over two calls: one event, NFE summed by the frontend."""
    from sglang_entropy.adapter.protocol import EVENTS_KEY, entropy_field

    config = SimpleNamespace(algorithm="CCD", block_size=4, first_done_first_out_mode=True)
    scheduler = SimpleNamespace(dllm_config=config)
    req = SimpleNamespace(rid="r", output_ids=[], origin_input_ids=[5, 6, 7, 8], extend_end=4, customized_info=None)
    req.to_finish = None
    batch = SimpleNamespace(reqs=[req])

    def call(accepted: int, extend_end: int, failure=None):
        req.extend_end = extend_end
        dllm.STATE.dllm_run = dllm.RunRecord(row_nfe=[1], failure=failure)
        dllm.attach_blocks(scheduler, batch, SimpleNamespace(accept_length_per_req_cpu=[accepted]))

    call(accepted=4, extend_end=4)  # the prompt's only block
    assert req.customized_info is None
    call(accepted=0, extend_end=8, failure=ZeroDivisionError("boom"))  # still masked after one step
    assert "boom" in req.to_finish.message  # SGLang applies it when the block is committed
    call(accepted=4, extend_end=8)
    (event,) = req.customized_info[EVENTS_KEY][0]
    assert event == {"kind": "block", "nfe": 2, "start": 0, "tokens": 4, "prompt_nfe": 1}
    shaped, _ = entropy_field(dict(req.customized_info), "ccd", 0)
    assert shaped["nfe"] == 3


def test_rows_decide_by_their_own_parameters():
    """A batch mixing settings: the same block under two budgets and early exits."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 8, 50, generator=generator).expand(2, 8, 50)  # [B, L, V], the same block twice
    masked = torch.ones(2, 8, dtype=torch.bool)
    launch = ccd.CCDParams(adaptive=False)
    rows = [launch, ccd.CCDParams(adaptive=False, budget=3, early_exit="linear", exit_tau_high=0.0, exit_tau_low=0.0)]
    state = ccd.CCD().denoise_start(2, 8, launch, "cpu")
    step = DenoiseStep(
        logits, masked, masked, torch.zeros(2, dtype=torch.int64), 9, launch, state, param_rows(rows, "cpu")
    )
    decision = ccd.CCD().unmask_step(step)
    assert decision.commit.sum(dim=1).tolist() == [1, 3]
    assert decision.exit.tolist() == [False, True]  # a threshold of 0: the second row exits at once
    assert decision.trace["budget"].tolist() == [1, 3]


def test_progression_answers_span_five_blocks_and_follow_the_step(model_path):
    import random

    from sglang_entropy_ccd.model import (
        LONG_CONFIG,
        encode_example,
        max_length,
        progression_problem,
        task_characters,
        task_tokens,
    )
    from transformers import AutoTokenizer

    rng = random.Random(3)
    for _ in range(50):
        prompt, answer = progression_problem(rng, LONG_CONFIG.terms)
        start, step = (int(x) for x in prompt[:-1].split("+"))
        terms = [int(t) for t in answer.split(",")]
        assert len(terms) == LONG_CONFIG.terms and 1 <= step <= 9 and len(answer) == 5 * LONG_CONFIG.terms - 1
        assert terms == [(start + k * step) % 10_000 for k in range(1, LONG_CONFIG.terms + 1)]
    tokenizer = AutoTokenizer.from_pretrained(model_path)  # the default model's: the task's tokens
    ids = task_tokens(tokenizer, task_characters(LONG_CONFIG))
    assert tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] == [ids[c] for c in prompt + answer]
    tokens, prompt_len = encode_example(prompt, answer, ids, LONG_CONFIG.block_size)
    answer_blocks = len(tokens) // LONG_CONFIG.block_size - prompt_len // LONG_CONFIG.block_size
    assert answer_blocks >= 5 and len(tokens) <= max_length(LONG_CONFIG)


def test_a_cached_model_trained_with_other_settings_is_known_stale(tmp_path):
    import json
    from dataclasses import asdict

    from sglang_entropy_ccd.model import LONG_CONFIG, TrainConfig, trained_with

    assert trained_with(tmp_path) is None  # nothing built there
    card = tmp_path / "sglang_entropy_model.json"
    card.write_text(json.dumps({"train_config": asdict(LONG_CONFIG)}))
    assert trained_with(tmp_path) == LONG_CONFIG
    older = {k: v for k, v in asdict(TrainConfig()).items() if k not in ("task", "terms")}  # an older card
    card.write_text(json.dumps({"train_config": {**older, "block_size": 8}}))
    assert trained_with(tmp_path) == TrainConfig() and trained_with(tmp_path) != LONG_CONFIG


def test_a_build_with_other_steps_does_not_replace_the_default_model():
    import dataclasses

    from sglang_entropy_ccd.model import LONG_CONFIG, TrainConfig, default_model_dir

    assert default_model_dir(LONG_CONFIG).name == "sdar-progression"
    assert default_model_dir(dataclasses.replace(LONG_CONFIG, steps=600)).name == "sdar-progression-600steps"
    assert default_model_dir(TrainConfig()).name == "sdar-addition"
