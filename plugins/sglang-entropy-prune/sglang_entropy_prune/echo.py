"""ECHO's pruning criteria (entropy-confidence hybrid), applied online while decoding.

Per step: entropy H_t, confidence c_t (-mean of the top-5 log-probabilities), group
confidence over a window, tail_t = mean c over the last 8 steps, dH_t = H_t - mean H of the
previous 4 steps. A trace stops at the first step where a selected criterion holds:
- lowest group confidence: the running minimum over full windows is below ``min_group_confidence``;
- tail decline: tail_t fell ``run_length`` steps in a row and tail_t <= ``tail_max``;
- entropy spike: dH_t rose ``run_length`` steps in a row and dH_t > ``spike_min``.
ECHO's own code applies these after generation; here they run on the device for the whole
batch. ECHO's window length was not published: ``window_size`` defaults to 16.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from sglang_entropy import hookimpl
from sglang_entropy.types import ConfidenceParams, DecodeDecision, DecodeStep, PolicySpec

NAME = "echo"
TAIL_TOKENS = 8  # tail confidence: mean c over the last 8 steps
ENTROPY_HISTORY = 4  # dH_t compares with the mean entropy of the previous 4 steps
STOP_REASONS = ("lowest_group_confidence", "tail_decline", "entropy_spike")
MAX_SIGNAL = 1e6  # confidences and entropies are >= 0 and finite in practice


class EchoParams(ConfidenceParams):
    lowest_group_confidence: bool = Field(True, description="select the lowest-group-confidence criterion")
    tail_decline: bool = Field(True, description="select the tail-decline criterion")
    entropy_spike: bool = Field(True, description="select the entropy-spike criterion")
    min_group_confidence: float = Field(
        0.4, ge=0, le=MAX_SIGNAL, description="stop when the running minimum group confidence is below"
    )
    tail_max: float = Field(
        1.0, ge=0, le=MAX_SIGNAL, description="tail decline stops only at or below this tail confidence"
    )
    spike_min: float = Field(
        0.5, ge=-MAX_SIGNAL, le=MAX_SIGNAL, description="entropy spike stops only above this entropy rise"
    )
    run_length: int = Field(3, ge=1, le=64, description="consecutive declines (or rises) that count")
    window_size: int = Field(16, ge=1, le=65536, description="tokens per group-confidence window")
    top_k: int = Field(5, ge=1, le=64, description="top-k log-probabilities per token confidence")

    @model_validator(mode="after")
    def _some_criterion(self):
        if not (self.lowest_group_confidence or self.tail_decline or self.entropy_spike):
            raise ValueError("select at least one criterion")
        return self


def init_buffers(num_slots: int, device) -> dict[str, torch.Tensor]:
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(num_slots, *shape, dtype=dtype, device=device)

    return {
        "seen": zeros(dtype=torch.int64),  # steps of this request so far
        "recent_confidence": zeros(TAIL_TOKENS),  # ring buffer, position seen % 8
        "recent_entropy": zeros(ENTROPY_HISTORY),  # ring buffer, position seen % 4
        "previous_tail": zeros(),
        "previous_entropy_rise": zeros(),
        "decline_run": zeros(dtype=torch.int64),
        "rise_run": zeros(dtype=torch.int64),
        "lowest_group": zeros().fill_(math.inf),
    }


def reset_slot(state: dict[str, torch.Tensor], slot: int) -> None:
    for name, buffer in state.items():
        buffer[slot] = math.inf if name == "lowest_group" else 0


def echo_stop(step: DecodeStep) -> DecodeDecision:
    state, slots, params = step.state, step.slots, step.params
    confidence, entropy = step.signals["confidence"], step.signals["entropy"]  # [B]
    seen = state["seen"][slots]  # [B] steps before this one

    # entropy rise against the previous ENTROPY_HISTORY steps (valid once there are that many)
    history = state["recent_entropy"][slots]  # [B, 4]
    entropy_rise = entropy - history.mean(dim=1)
    rise_valid = seen >= ENTROPY_HISTORY
    rose = rise_valid & (seen > ENTROPY_HISTORY) & (entropy_rise > state["previous_entropy_rise"][slots])
    rise_run = torch.where(rose, state["rise_run"][slots] + 1, torch.zeros_like(seen))

    # tail confidence over the last TAIL_TOKENS steps, this one included
    recent = state["recent_confidence"][slots]  # [B, 8]
    recent[torch.arange(recent.shape[0], device=recent.device), seen % TAIL_TOKENS] = confidence
    tail = recent.mean(dim=1)
    tail_valid = seen + 1 >= TAIL_TOKENS
    declined = tail_valid & (seen + 1 > TAIL_TOKENS) & (tail < state["previous_tail"][slots])
    decline_run = torch.where(declined, state["decline_run"][slots] + 1, torch.zeros_like(seen))

    group = step.signals["group_confidence"]
    lowest_group = torch.where(
        step.window_full, torch.minimum(state["lowest_group"][slots], group), state["lowest_group"][slots]
    )

    by_lowest = params["lowest_group_confidence"] & (lowest_group < params["min_group_confidence"])
    by_tail = params["tail_decline"] & tail_valid & (decline_run >= params["run_length"]) & (tail <= params["tail_max"])
    by_spike = (
        params["entropy_spike"] & rise_valid & (rise_run >= params["run_length"]) & (entropy_rise > params["spike_min"])
    )

    # write back this step's state (rows of other policies write to their own, unused, slots)
    entropy_history = state["recent_entropy"][slots]
    entropy_history[torch.arange(entropy_history.shape[0], device=entropy.device), seen % ENTROPY_HISTORY] = entropy
    state["recent_entropy"][slots] = entropy_history
    state["recent_confidence"][slots] = recent
    state["previous_tail"][slots] = tail
    state["previous_entropy_rise"][slots] = entropy_rise
    state["decline_run"][slots] = decline_run
    state["rise_run"][slots] = rise_run
    state["lowest_group"][slots] = lowest_group
    state["seen"][slots] = seen + 1

    reason = torch.where(by_lowest, 0, torch.where(by_tail, 1, 2))
    nan = torch.full_like(tail, math.nan)
    return DecodeDecision(
        stop=by_lowest | by_tail | by_spike,
        stop_reason=reason,
        event_values={
            "lowest_group_confidence": torch.where(torch.isinf(lowest_group), nan, lowest_group),
            "tail_confidence": torch.where(tail_valid, tail, nan),
            "entropy_rise": torch.where(rise_valid, entropy_rise, nan),
        },
    )


@hookimpl
def register_policies(register):
    register(
        PolicySpec(
            name=NAME,
            params=EchoParams,
            description="ECHO pruning criteria online: lowest group confidence, tail decline, entropy spike",
            stop_reasons=STOP_REASONS,
            signals=("entropy", "confidence", "group_confidence"),
        ),
        Echo(),
    )


class Echo:
    """The ``DecodePolicy``: ECHO's criteria over per-slot running statistics."""

    def init_state(self, num_slots, device):
        return init_buffers(num_slots, device)

    def request_start(self, request, state):
        reset_slot(state, request.slot)

    def decode_step(self, step: DecodeStep) -> DecodeDecision:
        return echo_stop(step)
