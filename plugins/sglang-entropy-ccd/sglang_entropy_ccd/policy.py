"""CCD-style adaptive unmasking with a SchED-style early exit, as the dLLM policy ``ccd``.

CCD (Coherent Contextual Decoding) judges a masked position by the consistency of its
prediction across denoising steps. Per block, at step t:

- score = negative entropy of each masked position's distribution;
- C_t = the top-n masked positions by score, with their argmax tokens; n starts at 1 and grows by
  1 per step up to ``budget + floor(budget * expand_ratio)`` (back to 1 once at most
  ``reset_share`` of the block stays masked);
- matched = positions of C_t that were in C_{t-1} with the same argmax token;
- from step ``warmup_steps`` on, if at least ``budget`` positions matched, commit all matched
  positions (adaptive budget); otherwise commit the ``budget`` best-scoring positions.

SchED early exit: once the mean top-1 minus top-2 logit margin over the block's still-masked
positions reaches tau(t / T) (T = the block's maximum steps), every remaining position takes its
argmax. (The mean is over the positions the exit would commit: a diffusion LM is trained to
predict masked positions only, so its outputs at committed ones carry no margin worth averaging.)
tau falls from ``exit_tau_high`` to ``exit_tau_low``: linear, cosine or exponential (rate ``exit_rate``).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field, model_validator

from sglang_entropy import hookimpl
from sglang_entropy.types import DenoiseStep, PolicyParams, PolicySpec, UnmaskDecision

POLICY = "ccd"
ALGORITHM = "CCD"
MAX_MARGIN = 1e6  # logit margins: >= 0, finite


class CCDParams(PolicyParams):
    """``--dllm-algorithm-config`` of ``--dllm-algorithm CCD`` (YAML; ``block_size`` is SGLang's)."""

    budget: int = Field(
        1, ge=1, le=4096, description="positions committed per step when too few predictions are consistent"
    )
    expand_ratio: float = Field(
        4.0, ge=0, le=4096, description="the candidate set grows to budget + floor(budget * ratio)"
    )
    warmup_steps: int = Field(1, ge=0, le=4096, description="steps of each block that commit the budget only")
    reset_share: float = Field(0.1, ge=0, le=1, description="candidate set back to 1 when this share stays masked")
    adaptive: bool = Field(True, description="commit every consistent position (off: always the budget)")
    early_exit: Literal["none", "linear", "cosine", "exponential"] = Field(
        "none", description="SchED threshold schedule; none disables the early exit"
    )
    # defaults chosen on the addition model's tuning questions (seed 99, not the bench's)
    exit_tau_high: float = Field(
        6.0, ge=-MAX_MARGIN, le=MAX_MARGIN, description="logit-margin threshold at the block's first step"
    )
    exit_tau_low: float = Field(2.0, ge=-MAX_MARGIN, le=MAX_MARGIN, description="threshold at the block's last step")
    exit_rate: float = Field(
        3.0, gt=0, le=1000, description="exponential schedule: tau_low + (high - low) * exp(-rate * t/T)"
    )

    @model_validator(mode="after")
    def _thresholds_fall(self):
        if self.exit_tau_low > self.exit_tau_high:
            raise ValueError("exit_tau_low must not exceed exit_tau_high (the schedule is non-increasing)")
        return self


EARLY_EXITS = typing.get_args(CCDParams.model_fields["early_exit"].annotation)  # index = encoded value


def max_candidates(rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B] the candidate set's cap: budget + floor(budget * expand_ratio)."""
    budget = rows["budget"]
    return budget + torch.floor(budget * rows["expand_ratio"]).long()


def exit_threshold(rows: Mapping[str, torch.Tensor], progress: torch.Tensor) -> torch.Tensor:
    """[B] tau(progress), non-increasing in progress = t / T (clamped to [0, 1]); +inf for
    rows without an early exit."""
    high, low = rows["exit_tau_high"], rows["exit_tau_low"]
    p = progress.float().clamp(0.0, 1.0)
    schedules = {
        "none": torch.full_like(p, math.inf),
        "linear": high - (high - low) * p,
        "cosine": low + (high - low) * 0.5 * (1 + torch.cos(math.pi * p)),
        "exponential": low + (high - low) * torch.exp(-rows["exit_rate"] * p),
    }
    tau = schedules["none"]
    for index, name in enumerate(EARLY_EXITS):
        tau = torch.where(rows["early_exit"] == index, schedules[name], tau)
    return tau


@hookimpl
def register_policies(register):
    register(
        PolicySpec(
            name=POLICY,
            params=CCDParams,
            description="CCD consistency-based adaptive unmasking with SchED early exit (diffusion LMs)",
            family="dllm",
            dllm_algorithm=ALGORITHM,
            signals=(),
        ),
        CCD(),
    )


class CCD:
    """The ``UnmaskPolicy`` SGLang runs for ``--dllm-algorithm CCD``."""

    def denoise_start(self, batch_size, block_size, params, device):
        return denoise_buffers(batch_size, block_size, device)

    def unmask_step(self, step: DenoiseStep) -> UnmaskDecision:
        return ccd_unmask(step)


def denoise_buffers(batch_size: int, block_size: int, device) -> dict[str, torch.Tensor]:
    return {
        "candidates": torch.zeros(batch_size, block_size, dtype=torch.bool, device=device),  # C_{t-1}
        "tokens": torch.full((batch_size, block_size), -1, dtype=torch.int64, device=device),  # argmax at t-1
        "set_size": torch.ones(batch_size, dtype=torch.int64, device=device),  # n
    }


def ccd_unmask(step: DenoiseStep) -> UnmaskDecision:
    rows = step.rows()  # each row's parameters, [B] per field
    logits = step.logits.float()  # [B, L, V]
    masked, state = step.masked, step.state  # [B, L]
    log_probs = logits.log_softmax(dim=-1)
    score = (log_probs.exp() * log_probs).sum(dim=-1)  # [B, L], negative entropy
    top2 = logits.topk(2, dim=-1)  # [B, L, 2]
    predicted = top2.indices[..., 0]  # [B, L]

    rank = _rank_among_masked(score, masked)  # [B, L], 0 = best masked position
    candidates = masked & (rank < state["set_size"][:, None])
    matched = candidates & state["candidates"] & (predicted == state["tokens"])
    budget = rows["budget"]  # [B]
    top_budget = masked & (rank < budget[:, None])
    adaptive = (matched.sum(dim=1) >= budget) & (step.step_index >= rows["warmup_steps"]) & rows["adaptive"]
    commit = torch.where(adaptive[:, None], matched, top_budget)

    margin = _mean_margin(top2.values, masked)  # [B]
    tau = exit_threshold(rows, step.step_index / step.max_steps)  # [B], inf: no early exit
    exit_now = margin >= tau

    left = (masked & ~commit).sum(dim=1)
    block = masked.shape[1]
    grown = torch.minimum(state["set_size"] + 1, max_candidates(rows))
    state["set_size"] = torch.where(left <= rows["reset_share"] * block, torch.ones_like(grown), grown)
    state["candidates"], state["tokens"] = candidates, predicted
    trace = {
        "score": score,
        "candidates": candidates,
        "matched": matched,
        "adaptive": adaptive,
        "budget": budget,
        "margin": margin,
        "tau": tau,
    }
    return UnmaskDecision(commit=commit, exit=exit_now, trace=trace)


def _rank_among_masked(score: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[B, L] rank of each position by score, masked positions first (ties: lower index first)."""
    keyed = score.masked_fill(~masked, -math.inf)
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    return torch.argsort(order, dim=1)


def _mean_margin(top2: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] mean top-1 minus top-2 logit ([B, L, 2] top-2 logits) over ``positions`` ([B, L] bool)."""
    margin = top2[..., 0] - top2[..., 1]
    weight = positions.float()
    return (margin * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
