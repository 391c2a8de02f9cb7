"""``taps``: send the target the proposal of the drafter that is most confident in it.

TAPS (routing among specialised drafters) scores each drafter's proposal by its own draft
confidence and verifies the best one. For a chain of N drafted tokens the confidence is the
mean over the chain of each token's draft probability, exp(log p_i) ("token"); TAPS's tree form,
the mean over nodes of the path probability exp(sum of log-probs from the root) ("path"),
applies to chains too (a chain's nodes are its prefixes).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, model_validator

from sglang_entropy import hookimpl
from sglang_entropy.types import DraftProposals, PolicyParams, PolicySpec, RouteDecision

NAME = "taps"
GRANULARITIES = ("step", "request")
CONFIDENCES = ("token", "path")


class TapsParams(PolicyParams):
    granularity: Literal["step", "request"] = Field(
        "step", description="step: choose at every speculative step; request: choose at the first and keep it"
    )
    confidence: Literal["token", "path"] = Field(
        "token", description="token: mean of exp(log-prob) per drafted token; path: mean of exp(cumulative log-prob)"
    )
    drafter: int | None = Field(
        None, ge=0, le=255, description="always route to this drafter (benchmarks); None: choose"
    )

    @model_validator(mode="after")
    def _drafter_exists(self, info: ValidationInfo):
        num_drafters = (info.context or {}).get("num_drafters")
        if self.drafter is not None and num_drafters is not None and self.drafter >= num_drafters:
            raise ValueError(f"drafter {self.drafter} does not exist: the server has {num_drafters} drafters")
        return self


def draft_confidence(proposals: DraftProposals, path: torch.Tensor) -> torch.Tensor:
    """[D, B] confidence of every drafter's proposal; ``path`` [B] bool selects the path form."""
    logprobs = proposals.logprobs.float()
    if proposals.parents is None:
        cumulative = logprobs.cumsum(-1)
    else:  # trees: a node's path log-prob is its own plus its ancestors'
        cumulative = _tree_cumulative(logprobs, proposals.parents)
    per_token = logprobs.exp().mean(-1)
    per_path = cumulative.exp().mean(-1)
    return torch.where(path[None, :], per_path, per_token)


def _tree_cumulative(logprobs: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    # Parents precede their children (EAGLE order) and a root's parent is -1; N passes of
    # "add the parent's sum" reach the deepest node without host-side control flow.
    cumulative = logprobs.clone()
    has_parent = parents >= 0
    safe = parents.clamp(min=0).long()
    for _ in range(logprobs.shape[-1]):
        cumulative = logprobs + torch.where(has_parent, cumulative.gather(-1, safe), torch.zeros_like(logprobs))
    return cumulative


def route(proposals: DraftProposals) -> RouteDecision:
    """The drafter for every row [B] and the confidences [D, B] it was chosen by."""
    params = proposals.params
    batch = proposals.logprobs.shape[1]
    device = proposals.logprobs.device
    path = params.get("confidence", torch.zeros(batch, dtype=torch.int64, device=device)) == CONFIDENCES.index("path")
    confidence = draft_confidence(proposals, path)
    chosen = confidence.argmax(0)
    keep = params.get("granularity", torch.zeros_like(chosen)) == GRANULARITIES.index("request")
    previous = proposals.previous if proposals.previous is not None else torch.full_like(chosen, -1)
    chosen = torch.where(keep & (previous >= 0), previous, chosen)
    forced = params.get("drafter", torch.full_like(chosen, -1))
    chosen = torch.where(forced >= 0, forced, chosen)  # validated against the server's drafters
    return RouteDecision(drafter=chosen, confidence=confidence)


@hookimpl
def register_policies(register):
    register(
        PolicySpec(
            name=NAME,
            params=TapsParams,
            description="verify the draft of the most confident drafter (TAPS); needs a server with --entropy-drafters",
            family="speculative",
            signals=(),
        ),
        Taps(),
    )


class Taps:
    """The ``RoutePolicy``: route each row to its most confident drafter."""

    def route_drafts(self, proposals: DraftProposals) -> RouteDecision:
        return route(proposals)
