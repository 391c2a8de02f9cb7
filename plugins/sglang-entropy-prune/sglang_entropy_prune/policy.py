"""DeepConf online: stop a trace at the first token where its full sliding-window group
confidence falls below a threshold (Fu et al. 2025).

Group confidence is the mean DeepConf token confidence (-mean of the top-k log-probabilities)
over the last ``window_size`` tokens; the window is "full" once the trace has that many tokens.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from sglang_entropy import hookimpl
from sglang_entropy.types import DecodeDecision, DecodeStep, PolicySpec

NAME = "deepconf"


class DeepConfParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(description="stop when the full window's mean confidence falls below this")
    window_size: int = Field(2048, ge=1, description="tokens per group-confidence window")
    top_k: int = Field(20, ge=1, le=64, description="top-k log-probabilities per token confidence")


def deepconf_stop(step: DecodeStep) -> DecodeDecision:
    group_confidence = step.signals["group_confidence"]  # [B]
    threshold = step.params["threshold"]  # [B]
    stop = step.window_full & (group_confidence < threshold)
    return DecodeDecision(
        stop=stop,
        event_values={"group_confidence": group_confidence, "threshold": threshold},
    )


@hookimpl
def register_policies(register):
    register(
        PolicySpec(
            name=NAME,
            params=DeepConfParams,
            description="DeepConf online: stop a trace once its window group confidence falls below a threshold",
            stop_reasons=("low_group_confidence",),
            signals=("confidence", "group_confidence"),
        )
    )


@hookimpl
def decode_step(policy, step):
    if policy != NAME:
        return None
    return deepconf_stop(step)
