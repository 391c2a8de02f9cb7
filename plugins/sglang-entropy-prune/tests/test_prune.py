"""The prune plugin's policies and voting library, without a server."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sglang_entropy_prune import echo
from sglang_entropy_prune.policy import DeepConfParams, trace_finished
from sglang_entropy_prune.voting import (
    Trace,
    calibrated_threshold,
    extract_answer,
    lowest_group_confidence,
    vote,
)

from sglang_entropy.testing import reference
from sglang_entropy.types import DecodeStep, TraceGroup, TraceSummary

confidences = st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=80)


@pytest.mark.parametrize(
    "text, answer_format, expected",
    [
        ("so she has 18 left.\n#### 18", "auto", "18"),
        ("The total is 1,234 dollars. #### $1,234", "gsm8k", "1234"),
        ("Hence \\boxed{\\frac{1}{2}} is it", "boxed", "\\frac{1}{2}"),
        ("we get \\boxed{42.0}.", "auto", "42"),
        ("3 + 4 = 7. So 3 + 4 is 7", "auto", "7"),
        ("What is 5 + 2? The sum 5 + 2 = 7 apples", "number", "7"),
        ("no digits here", "auto", None),
        ("#### nothing", "gsm8k", None),
        ("-3 apples", "auto", "-3"),
    ],
)
def test_extract_answer(text, answer_format, expected):
    assert extract_answer(text, answer_format) == expected


@given(confidences, st.integers(1, 30))
def test_lowest_group_confidence_is_the_smallest_full_window_mean(values, window):
    if len(values) < window:
        expected = np.mean(values)
    else:
        expected = min(np.mean(values[i : i + window]) for i in range(len(values) - window + 1))
    assert lowest_group_confidence(values, window) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=40), st.floats(0, 100))
def test_calibrated_threshold_is_numpys_percentile(values, percentile):
    assert calibrated_threshold(values, percentile) == pytest.approx(np.percentile(values, percentile), abs=1e-9)


def test_vote_weights_by_confidence_and_skips_early_stopped_traces():
    traces = [
        Trace("= 7", [1.0] * 4),
        Trace("= 7", [1.0] * 4),
        Trace("= 8", [5.0] * 4),
        Trace("= 9", [50.0] * 4, stopped_early=True),  # would win every vote if it voted
    ]
    result = vote(traces, window=2, eta=10)
    assert result.voters == 3
    assert result.majority == "7"
    assert result.weighted == "8"
    assert result.filtered == "8"  # the single most confident trace
    assert result.tallies == {"7": 2.0, "8": 5.0}
    assert result.weighted_support == pytest.approx(5 / 7)
    assert vote([Trace("no answer", [1.0])]).voters == 0


def test_deepconf_params_need_a_threshold_or_a_group():
    with pytest.raises(ValidationError, match="threshold"):
        DeepConfParams.model_validate({})
    assert DeepConfParams.model_validate({}, context={"n": 8}).warmup_traces == 16
    assert DeepConfParams.model_validate({"group_id": "q1"}).threshold is None
    assert DeepConfParams.model_validate({"threshold": 3.0}).warmup_traces == 0  # fixed: no warm-up


def _summary(conf, text="= 7", warmup=True, stopped=False):
    return TraceSummary("r", text, len(conf), {"confidence": conf}, stopped_early=stopped, warmup=warmup)


def test_calibration_sets_the_percentile_after_the_last_warmup_trace():
    params = DeepConfParams.model_validate({"warmup_traces": 3, "percentile": 90, "window_size": 2}, context={"n": 8})
    group = TraceGroup("g", "deepconf", params)
    traces = [[3.0, 1.0, 2.0], [5.0, 5.0], [2.0, 9.0, 9.0, 4.0]]
    updates = []
    for conf in traces:
        group.finished.append(_summary(conf))
        updates.append(trace_finished(group, group.finished[-1]))
    assert updates[0].params == updates[1].params == {}
    lowest = [2.0, 5.0, 5.5]  # smallest mean over windows of 2
    assert updates[2].params == {"threshold": pytest.approx(np.percentile(lowest, 90))}


def test_consensus_stops_the_group_once_calibrated():
    params = DeepConfParams.model_validate(
        {"warmup_traces": 2, "consensus": 0.9, "min_votes": 2, "window_size": 1}, context={"n": 8}
    )
    group = TraceGroup("g", "deepconf", params)
    group.finished.append(_summary([1.0]))
    assert not trace_finished(group, group.finished[-1]).stop_group  # not calibrated yet
    group.finished.append(_summary([1.0]))
    update = trace_finished(group, group.finished[-1])
    assert update.params and update.stop_group  # 2 votes, all for "7"
    group.overrides = update.params
    group.finished.append(_summary([10.0], text="= 8", warmup=False))
    assert not trace_finished(group, group.finished[-1]).stop_group  # the leader, 8, holds 10/12 < 0.9


# --- ECHO, step by step against a plain-Python reference ------------------------------------


def echo_reference(entropy, confidence, window, params):
    """First step at which a selected ECHO criterion holds, or None."""
    group = reference.window_means(confidence, window)
    lowest, previous_tail, previous_rise, decline, rise = math.inf, None, None, 0, 0
    for t in range(len(entropy)):
        rise_t = entropy[t] - np.mean(entropy[t - 4 : t]) if t >= 4 else None
        rise = rise + 1 if (rise_t is not None and previous_rise is not None and rise_t > previous_rise) else 0
        tail = np.mean(confidence[t - 7 : t + 1]) if t >= 7 else None
        decline = decline + 1 if (tail is not None and previous_tail is not None and tail < previous_tail) else 0
        if t >= window - 1:
            lowest = min(lowest, group[t])
        if params["lowest_group_confidence"] and lowest < params["min_group_confidence"]:
            return t, "lowest_group_confidence"
        if (
            params["tail_decline"]
            and tail is not None
            and decline >= params["run_length"]
            and tail <= params["tail_max"]
        ):
            return t, "tail_decline"
        if (
            params["entropy_spike"]
            and rise_t is not None
            and rise >= params["run_length"]
            and rise_t > params["spike_min"]
        ):
            return t, "entropy_spike"
        previous_tail, previous_rise = tail, rise_t
    return None


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.booleans())
def test_echo_stops_where_the_reference_does(seed, lowest_on, tail_on, spike_on):
    if not (lowest_on or tail_on or spike_on):
        lowest_on = True
    generator = np.random.default_rng(seed)
    rows, steps, window = 6, 40, 5
    entropy = generator.gamma(2.0, 1.0, size=(rows, steps))
    confidence = generator.gamma(3.0, 0.5, size=(rows, steps))
    params = echo.EchoParams(
        lowest_group_confidence=lowest_on,
        tail_decline=tail_on,
        entropy_spike=spike_on,
        min_group_confidence=0.9,
        tail_max=1.6,
        spike_min=0.3,
        run_length=2,
        window_size=window,
    ).model_dump()
    num_slots = rows + 3
    state = echo.init_buffers(num_slots, "cpu")
    slots = torch.arange(2, 2 + rows)
    for slot in slots.tolist():
        echo.reset_slot(state, slot)
    device_params = {
        k: torch.full((rows,), v, dtype=torch.float32 if isinstance(v, float) else None) for k, v in params.items()
    }
    first_stop = [None] * rows
    for t in range(steps):
        conf_t = torch.tensor(confidence[:, t], dtype=torch.float32)
        group = torch.tensor(
            [reference.window_means(confidence[r, : t + 1], window)[t] for r in range(rows)], dtype=torch.float32
        )
        step = DecodeStep(
            mask=torch.ones(rows, dtype=torch.bool),
            slots=slots,
            token_index=torch.full((rows,), t),
            window_full=torch.full((rows,), t >= window - 1),
            signals={
                "entropy": torch.tensor(entropy[:, t], dtype=torch.float32),
                "confidence": conf_t,
                "group_confidence": group,
            },
            params=device_params,
            state=state,
            logits=torch.zeros(rows, 4),
        )
        decision = echo.echo_stop(step)
        for r in range(rows):
            if first_stop[r] is None and bool(decision.stop[r]):
                first_stop[r] = (t, echo.STOP_REASONS[int(decision.stop_reason[r])])
    for r in range(rows):
        assert first_stop[r] == echo_reference(
            entropy[r].astype(np.float32).astype(float), confidence[r].astype(np.float32).astype(float), window, params
        )


def test_bench_scores_a_question_from_the_servers_outputs():
    from sglang_entropy_prune.bench import Question, arithmetic_questions, score, summarize

    def output(text, tokens, conf, stopped=False):
        finish = {"type": "stop", "entropy_policy": "deepconf"} if stopped else {"type": "stop", "matched": 2}
        return {
            "text": text,
            "meta_info": {
                "completion_tokens": tokens,
                "finish_reason": finish,
                "entropy": {"signals": {"confidence": conf}},
            },
        }

    outputs = [
        output("= 7", 3, [1.0]),
        output("= 7", 4, [1.0]),
        output("= 8", 5, [9.0]),
        output("= 9", 2, [99.0], True),
    ]
    result = score(Question("What is 3 + 4?", "7", "number"), outputs, window=4)
    assert result == {
        "tokens": 14,
        "traces": 4,
        "stopped_early": 1,
        "trace_accuracy": 2 / 3,
        "majority": True,
        "weighted": False,  # 9.0 for "8" outweighs 2.0 for "7"
        "filtered": False,
    }
    rows = summarize({"full": [result], "pruned": [{**result, "tokens": 7}]}, {"full": 2.0, "pruned": 1.0})
    assert [(r["token_ratio"], r["time_ratio"]) for r in rows] == [(1.0, 1.0), (0.5, 0.5)]
    questions = arithmetic_questions(5, seed=3)
    assert questions == arithmetic_questions(5, seed=3) and all(q.answer_format == "number" for q in questions)
