"""EAGer (Scalena et al. 2025): a request starts one sequence; wherever a sequence's top-K
entropy exceeds ``threshold`` it forks, until the request holds ``max_sequences`` sequences.
The adapter carries out the fork inside the scheduler (the child reuses the parent's KV).

EAGer-adapt budget rule: requests that name the same ``budget_group`` share ``budget``
sequences. Each request's first sequence takes one; each fork takes one more while any are
left (and the request holds fewer than ``max_sequences``). Prompts whose tokens stay below the
threshold never fork, so the budget they leave goes to the prompts that still branch."""

from __future__ import annotations

import torch
from pydantic import Field, ValidationInfo, model_validator

from sglang_entropy import hookimpl
from sglang_entropy.settings import SAMPLING_EPS
from sglang_entropy.types import BranchParams, DecodeDecision, DecodeStep, PolicySpec, TopKEntropyParams

NAME = "eager"


class EagerParams(TopKEntropyParams, BranchParams):
    """``entropy_top_k``, ``max_sequences``, ``budget_group`` and ``budget`` as the contract declares them."""

    threshold: float = Field(2.4, ge=0, le=64, description="fork where the top-K entropy (at most log K) exceeds this")
    echo_width: bool = Field(
        False,
        description="fork clip(round(1 + 2(H - 1)/2.5 - (G - 1.2)/1.2), 1, 4) sequences (ECHO's width from "
        "entropy H and group confidence G) instead of one",
    )

    @model_validator(mode="after")
    def _needs_sampling(self, info: ValidationInfo):
        if (self.budget_group is None) != (self.budget is None):
            raise ValueError("budget_group and budget go together")
        context = info.context or {}
        temperature = context.get("temperature")
        if context.get("greedy") or (temperature is not None and temperature < SAMPLING_EPS):
            raise ValueError(
                f"eager needs sampling: temperature > 0 and top_k != 1 (got temperature {temperature}; "
                f"the engine samples greedily below {SAMPLING_EPS}): greedy branches would repeat the parent"
            )
        return self


def echo_width(entropy: torch.Tensor, group_confidence: torch.Tensor) -> torch.Tensor:
    """ECHO's branch width: more branches at higher entropy, fewer at higher group confidence."""
    width = 1 + 2 * (entropy - 1.0) / (3.5 - 1.0) - (group_confidence - 1.2) / 1.2
    return torch.round(width).clamp(1, 4).long()


def eager_branch(step: DecodeStep) -> DecodeDecision:
    topk_entropy = step.signals["topk_entropy"]  # [B]
    branch = topk_entropy > step.params["threshold"]
    width = torch.where(
        step.params["echo_width"],
        echo_width(step.signals["entropy"], step.signals["group_confidence"]),
        torch.ones_like(branch, dtype=torch.long),
    )
    return DecodeDecision(branch_width=torch.where(branch, width, 0), event_values={"topk_entropy": topk_entropy})


@hookimpl
def register_policies(register):
    register(
        PolicySpec(
            name=NAME,
            params=EagerParams,
            description="EAGer: fork a sequence where its top-K entropy exceeds a threshold, up to max_sequences",
            stop_reasons=(),
            signals=("topk_entropy", "entropy", "group_confidence"),
            branches=True,
        ),
        Eager(),
    )


class Eager:
    """The ``DecodePolicy``: a branch width per row, carried out by the adapter."""

    def decode_step(self, step: DecodeStep) -> DecodeDecision:
        return eager_branch(step)
