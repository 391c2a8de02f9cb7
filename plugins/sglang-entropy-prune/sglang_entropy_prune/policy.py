"""DeepConf online (Fu et al. 2025): stop a trace at the first token where its full
sliding-window group confidence falls below a threshold, calibrate that threshold from a
group's warm-up traces, stop a group at consensus, and vote with confidence.

Group confidence is the mean DeepConf token confidence (-mean of the top-k log-probabilities)
over the last ``window_size`` tokens; the window is "full" once the trace has that many tokens.
"""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sglang_entropy import hookimpl
from sglang_entropy.types import (
    ConfidenceParams,
    DecodeDecision,
    DecodeStep,
    GroupParams,
    GroupUpdate,
    PolicySpec,
    TraceGroup,
    TraceSummary,
    Vote,
)
from sglang_entropy_prune.voting import AnswerFormat, Trace, calibrated_threshold, lowest_group_confidence, vote

NAME = "deepconf"
MAX_CONFIDENCE = 1e6  # token confidence is -mean log p of the top k: >= 0, and finite in practice
MAX_TRACES = 4096


class DeepConfParams(GroupParams, ConfidenceParams):
    """``group_id``, ``warmup_traces``, ``window_size`` and ``top_k`` as the contract declares them."""

    threshold: float | None = Field(
        None,
        ge=0,
        le=MAX_CONFIDENCE,
        validate_default=True,
        description="stop when the full window's mean confidence falls below this; "
        "leave it out to calibrate it from a group's warm-up traces",
    )
    percentile: float = Field(
        90,
        ge=0,
        le=100,
        description="threshold = this percentile of the warm-up traces' lowest group confidences "
        "(90: DeepConf-low, 10: DeepConf-high)",
    )
    consensus: float | None = Field(
        None, gt=0, le=1, description="stop the group once the leading answer holds this share of the weighted vote"
    )
    min_votes: int = Field(4, ge=1, le=MAX_TRACES, description="votes needed before a consensus stop")
    answer_format: AnswerFormat = Field("auto", description="how answers are read for consensus and the vote")

    @field_validator("threshold")
    @classmethod
    def _threshold_or_group(cls, threshold, info: ValidationInfo):
        grouped = info.data.get("group_id") is not None or (info.context or {}).get("n", 1) > 1
        if threshold is None and not grouped:
            raise ValueError("required unless the request forms a group that calibrates it (n > 1 or group_id)")
        return threshold

    @model_validator(mode="after")
    def _warmup_calibrates(self):
        if self.threshold is not None:
            self.warmup_traces = 0  # a fixed threshold needs no warm-up
        elif self.warmup_traces == 0:
            raise ValueError("warmup_traces: a group without a fixed threshold needs at least 1 warm-up trace")
        return self


def deepconf_stop(step: DecodeStep) -> DecodeDecision:
    group_confidence = step.signals["group_confidence"]  # [B]
    threshold = step.params["threshold"]  # [B]; NaN while a group calibrates: never stops
    stop = step.window_full & (group_confidence < threshold)
    return DecodeDecision(
        stop=stop,
        event_values={"group_confidence": group_confidence, "threshold": threshold},
    )


def _voting_traces(group: TraceGroup) -> list[Trace]:
    return [Trace(t.text, t.signals.get("confidence", []), t.stopped_early) for t in group.finished]


def group_vote_of(group: TraceGroup):
    params = group.params
    return vote(_voting_traces(group), params.answer_format, params.window_size)


def trace_finished(group: TraceGroup, trace: TraceSummary) -> GroupUpdate:
    params: DeepConfParams = group.params
    update = GroupUpdate()
    warmups = [t for t in group.finished if t.warmup]
    if trace.warmup and params.threshold is None and len(warmups) == params.warmup_traces:
        lowest = [lowest_group_confidence(t.signals.get("confidence", []), params.window_size) for t in warmups]
        update.params = {"threshold": calibrated_threshold(lowest, params.percentile)}
    calibrated = params.threshold is not None or "threshold" in group.overrides or update.params
    if params.consensus is not None and calibrated:
        result = group_vote_of(group)
        update.stop_group = result.voters >= params.min_votes and result.weighted_support >= params.consensus
    return update


@hookimpl
def register_policies(register):
    register(
        PolicySpec(
            name=NAME,
            params=DeepConfParams,
            description="DeepConf online: stop a trace once its window group confidence falls below a "
            "threshold, fixed or calibrated from a group's warm-up traces",
            stop_reasons=("low_group_confidence",),
            signals=("confidence", "group_confidence"),
            groups=True,
        ),
        DeepConf(),
    )


class DeepConf:
    """The ``DecodePolicy``: the online stop on the device, calibration and voting per group."""

    def decode_step(self, step: DecodeStep) -> DecodeDecision:
        return deepconf_stop(step)

    def group_trace_finished(self, group: TraceGroup, trace: TraceSummary) -> GroupUpdate:
        return trace_finished(group, trace)

    def group_vote(self, group: TraceGroup) -> Vote:
        result = group_vote_of(group)
        return Vote(answer=result.weighted, support=result.weighted_support, tallies=result.tallies)
