"""The values that cross the hook contract. Tensors live on the model's device."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field


class PolicyParams(BaseModel):
    """Base of every policy's parameters (``PolicySpec.params`` must extend it).

    Requests configure a policy only with data: unknown keys, NaN and infinities are refused,
    and registration checks that every number has a lower and an upper bound and every string
    a maximum length, so no request can write a value that does not fit the adapter's device
    buffers (int64, float32) or makes a policy silently do nothing.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Parameters the adapter itself reads. A policy that has them extends these models (and may
# change their defaults); registration checks that group and branching policies do.


class ConfidenceParams(PolicyParams):
    """How the adapter computes the confidence signals of the policy's requests (instead of
    the server's ``[signals]`` settings)."""

    top_k: int = Field(20, ge=1, le=64, description="top-k log-probabilities per token confidence")
    window_size: int = Field(2048, ge=1, le=65536, description="tokens per group-confidence window")


class TopKEntropyParams(PolicyParams):
    """How the adapter computes ``topk_entropy`` for the policy's requests."""

    entropy_top_k: int = Field(20, ge=2, le=64, description="K of the renormalised top-K entropy")


class GroupParams(PolicyParams):
    """A policy registered with ``groups=True``: how the adapter forms and runs its groups."""

    group_id: str | None = Field(
        None, min_length=1, max_length=128, description="requests with the same group_id form one group"
    )
    warmup_traces: int = Field(
        16, ge=0, le=4096, description="traces of a group that run first; the others wait for them to finish"
    )
    threshold: float | None = Field(
        None, ge=-1e6, le=1e6, description="the group's decision threshold, reported with each trace"
    )


class BranchParams(PolicyParams):
    """A policy registered with ``branches=True``: how many sequences the adapter may fork."""

    max_sequences: int = Field(32, ge=1, le=256, description="sequences per request, the first included")
    budget_group: str | None = Field(
        None, min_length=1, max_length=128, description="requests naming the same group share one budget"
    )
    budget: int | None = Field(None, ge=1, le=65536, description="sequences all requests of budget_group may hold")


@dataclass(frozen=True)
class PolicySpec:
    """What a plugin registers: a policy's name, its parameters and what it may decide.

    ``params`` is a ``PolicyParams`` model (a ``GroupParams`` for ``groups``, a
    ``BranchParams`` for ``branches``); a request's ``params`` are validated against it, so a
    policy is only ever configured by data. Numeric fields (int, float, bool) are also kept
    on the device, one value per request slot, and reach ``decode_step`` as ``step.params``.
    ``stop_reasons`` names the reasons a ``DecodeDecision.stop_reason`` indexes. ``signals``
    names the signals ``decode_step`` reads: entropy and varentropy cost extra passes over the
    vocabulary, so they are computed only while a running request needs them.

    ``groups``: a request of this policy with ``n`` > 1, or with a ``group_id`` parameter, is
    run as a group of traces (see ``group_trace_finished``). If the parameters define
    ``warmup_traces``, that many traces of a group run first and the others wait for them.
    """

    name: str
    params: type[BaseModel]
    description: str = ""
    stop_reasons: tuple[str, ...] = ("policy",)
    signals: tuple[str, ...] = ("entropy", "topk_entropy", "confidence", "margin", "varentropy", "group_confidence")
    family: str = "decode"  # "decode", "dllm" or "speculative"
    dllm_algorithm: str | None = None  # family "dllm": the name --dllm-algorithm selects in SGLang
    groups: bool = False
    branches: bool = False  # its branch decisions fork sequences; the response lists them all


@dataclass
class DecodeStep:
    """One decode step of the continuous batch, as seen by one policy.

    Every tensor covers the whole batch (B rows, in the batch's order) so that no policy has
    to gather its rows (which would need a host sync); ``mask`` marks the rows whose request
    uses this policy, and decisions on other rows are ignored.
    """

    mask: torch.Tensor  # [B] bool, rows of this policy
    slots: torch.Tensor  # [B] int64, request slot of each row (index into ``state`` buffers)
    token_index: torch.Tensor  # [B] int64, output index of the token being sampled
    window_full: torch.Tensor  # [B] bool, the group-confidence window holds window_size tokens
    signals: Mapping[str, torch.Tensor]  # signal name -> [B] float32 (see sglang_entropy.signals)
    params: Mapping[str, torch.Tensor]  # numeric parameter name -> [B], this request's value
    state: dict[str, torch.Tensor]  # the policy's own per-slot buffers from ``init_state``
    logits: torch.Tensor  # [B, V] next-token logits (read-only; adjust through the decision)


@dataclass
class DecodeDecision:
    """A policy's answer for one decode step; every field is optional and [B]-shaped.

    ``stop``: end the sequence after this token. ``stop_reason``: index into the policy's
    ``stop_reasons``. ``branch_width``: number of extra sequences to fork from this point
    (0 = none). ``logit_bias``: [B, V] added to the logits before sampling. ``event_values``:
    numbers recorded with the stop or branch event of a row (e.g. the confidence that crossed).
    """

    stop: torch.Tensor | None = None
    stop_reason: torch.Tensor | None = None
    branch_width: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None
    event_values: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestInfo:
    """A request as the lifecycle hooks see it (host side, once per request, not per step)."""

    rid: str
    slot: int
    policy: str
    params: BaseModel
    group_id: str | None = None
    prompt_tokens: int = 0


@dataclass
class TraceSummary:
    """One finished trace of a group: enough to calibrate, reallocate and vote."""

    rid: str
    text: str
    output_tokens: int
    signals: Mapping[str, list[float]]
    stopped_early: bool  # a policy stopped it (it does not vote)
    finish_reason: Mapping[str, Any] | None = None
    warmup: bool = False  # one of the group's warm-up traces


@dataclass
class TraceGroup:
    """The traces of one question: a request with ``n`` samples, or requests sharing ``group_id``."""

    group_id: str
    policy: str
    params: BaseModel  # the parameters of the request that opened the group
    finished: list[TraceSummary] = field(default_factory=list)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # parameters set by earlier GroupUpdates


@dataclass
class GroupUpdate:
    """What a group hook may change for the group's traces that have not started yet."""

    params: Mapping[str, Any] = field(default_factory=dict)  # parameter overrides, validated again
    stop_group: bool = False  # start no further traces (e.g. consensus reached)


@dataclass
class Vote:
    answer: str | None
    support: float  # the winning answer's share of the (weighted) vote
    tallies: Mapping[str, float]


@dataclass
class DenoiseStep:
    """One denoising step of a diffusion LM over a batch of blocks (one block per request).

    The block is the canvas the model fills: ``L`` positions, of which ``canvas`` are being
    generated (in a request's first block the prompt's tail takes the others) and ``masked``
    are still masked. ``step_index`` counts the steps each row has already taken on its block
    (rows may be at different steps: SGLang's first-done-first-out mode batches blocks as they
    come); ``max_steps`` is the most a block may take.
    """

    logits: torch.Tensor  # [B, L, V] logits at every position of the block
    masked: torch.Tensor  # [B, L] bool, positions still masked
    canvas: torch.Tensor  # [B, L] bool, positions generated in this block (masked at its first step)
    step_index: torch.Tensor  # [B] int64
    max_steps: int
    params: BaseModel  # the policy's parameters from --dllm-algorithm-config (the launch's)
    state: dict[str, torch.Tensor]  # the policy's buffers from ``denoise_start``, [B, ...]
    # each row's parameters, [B] per field (``encode_params``): its request's
    # ``custom_params.entropy.params`` over the launch's; empty when every row has ``params``
    row_params: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def rows(self) -> Mapping[str, torch.Tensor]:
        """Each row's parameters, [B] per field, on the logits' device."""
        if self.row_params:
            return self.row_params
        return param_rows([self.params] * self.logits.shape[0], self.logits.device)


@dataclass
class UnmaskDecision:
    """Which masked positions to commit (each takes its argmax token), for every row.

    ``commit``: [B, L] bool; positions that are not masked are ignored; a row that still has
    masked positions and commits none gets its most probable position committed, so a block
    always ends. ``exit``: [B] bool, commit every remaining position now (early exit).
    ``trace``: [B] or [B, L] tensors recorded for each step of a block when a request asks for
    the debug trace (``custom_params.entropy.dllm_trace``), under these names.
    """

    commit: torch.Tensor
    exit: torch.Tensor | None = None
    trace: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DraftProposals:
    """The drafts of every drafter for one speculative step.

    ``params``: the policy's parameters, one [B] device tensor per field: numbers as they are
    (an optional int that is None is -1, an optional float NaN), a ``Literal`` of strings as
    the index of the value among the Literal's choices. ``previous``: the drafter chosen for
    each row at its request's previous step, -1 at its first.
    """

    tokens: torch.Tensor  # [D, B, N] drafted token ids (chains: N steps; trees: N nodes)
    logprobs: torch.Tensor  # [D, B, N] draft log-probability of each drafted token
    parents: torch.Tensor | None = None  # [D, B, N] parent node per tree node (-1: root); None for chains
    drafter_names: tuple[str, ...] = ()
    params: Mapping[str, torch.Tensor] = field(default_factory=dict)
    previous: torch.Tensor | None = None  # [B] int64


@dataclass
class RouteDecision:
    """Which drafter's proposal the target verifies, per row, and the scores it was chosen by
    (reported to the client with every step)."""

    drafter: torch.Tensor  # [B] int64
    confidence: torch.Tensor | None = None  # [D, B] float


def encode_params(params: BaseModel) -> dict[str, float | int | bool]:
    """A policy's pydantic parameters as numbers: a Literal of strings becomes the index of the
    value among its choices, None -1 (int fields) or NaN (float fields)."""
    encoded = {}
    for name, info in type(params).model_fields.items():
        value = getattr(params, name)
        args = typing.get_args(info.annotation)
        if typing.get_origin(info.annotation) is typing.Literal:
            encoded[name] = args.index(value)
        elif isinstance(value, bool | int | float):
            encoded[name] = value
        elif value is None and int in args:
            encoded[name] = -1
        elif value is None and float in args:
            encoded[name] = math.nan
    return encoded


def param_rows(rows: list[BaseModel], device) -> dict[str, torch.Tensor]:
    """One [B] tensor per numeric field of the rows' parameters (``encode_params``): bool, int64
    or float32 by the first row's value."""
    encoded = [encode_params(p) for p in rows]
    columns = {}
    for name, first in encoded[0].items():
        dtype = torch.bool if isinstance(first, bool) else torch.int64 if isinstance(first, int) else torch.float32
        columns[name] = torch.tensor([e[name] for e in encoded], dtype=dtype, device=device)
    return columns
