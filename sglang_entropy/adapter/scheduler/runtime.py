"""The adapter's scheduler side: per-slot device buffers, the decode-step observer, and the
host-side bookkeeping that turns device decisions into finished requests and response fields.

The flow per step:
1. ``EntropyObserver.before_grammar`` (model runner, device): signals for every row of the
   batch, group-confidence windows, every active policy's ``decode_step``; all results are
   stacked into one [B, C] tensor (``StepOutput``) that SGLang copies to the host with the
   step's other outputs, without a sync in the step.
2. ``HostStepOutput.stops`` (scheduler, from ``hooks.apply_stops`` before SGLang commits the
   step's tokens): rows whose policy said stop get ``req.to_finish``, so the request ends on
   exactly that token; then the branch bookkeeping forks the rows that asked for it.
3. ``HostStepOutput.consume`` (scheduler, after the commit): the committed tokens' signals and
   events go into ``req.customized_info``, which SGLang streams to the tokenizer manager.
"""

from __future__ import annotations

import logging
import math
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from sglang_entropy.adapter.metrics import NoMetrics
from sglang_entropy.adapter.protocol import (
    EVENTS_KEY,
    SIGNAL_KEY,
    EntropyStop,
    policy_failure,
    put_token_value,
)
from sglang_entropy.registry import PolicyRegistry
from sglang_entropy.settings import ResolvedRequest, ServerSettings
from sglang_entropy.signals import FULL_VOCAB_SIGNALS, SIGNAL_NAMES, GroupConfidenceWindows, Workspace, token_signals
from sglang_entropy.types import DecodeStep, GroupParams, RequestInfo

logger = logging.getLogger(__name__)

FIXED_COLUMNS = ("valid", "token_index", *SIGNAL_NAMES, "stop", "stop_reason", "branch_width")
SCRATCH_SLOT = 0  # SGLang's request pool keeps row 0 as padding; rows that must not write go here


@dataclass
class RequestRecord:
    """Host-side state of one running request that asked for signals or a policy."""

    rid: str
    slot: int
    resolved: ResolvedRequest
    policy_index: int  # -1 without a policy
    info: RequestInfo | None
    signals: frozenset[str]  # signals this request or its policy reads


def _param_dtype(annotation) -> torch.dtype | None:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and set(typing.get_args(annotation)) == {
        float,
        type(None),
    }:
        return torch.float32  # None is stored as NaN: every comparison with it is False
    if annotation is bool:
        return torch.bool
    if annotation is int:
        return torch.int64
    if annotation is float:
        return torch.float32
    return None


class EntropyRuntime:
    """Per-slot buffers and per-request records of one scheduler (one model runner)."""

    def __init__(self, num_slots: int, device: torch.device, settings: ServerSettings, registry: PolicyRegistry):
        self.settings = settings
        self.registry = registry
        self.device = device
        # diffusion policies run as SGLang dLLM algorithms (adapter/dllm.py), not in the decode step
        self.policies = [p for p in settings.enabled_policies(registry) if registry.get(p).spec.family == "decode"]
        signals = settings.config.signals
        zeros = lambda dtype: torch.zeros(num_slots, dtype=dtype, device=device)  # noqa: E731
        self.active = zeros(torch.bool)
        self.prompt_len = zeros(torch.int64)
        self.first_index = zeros(torch.int64)  # first output index this slot sees (> 0 after a retraction)
        self.confidence_k = zeros(torch.int64).fill_(signals.confidence_top_k)
        self.entropy_k = zeros(torch.int64).fill_(signals.entropy_top_k)
        self.window = zeros(torch.int64).fill_(signals.window_size)
        self.policy_index = zeros(torch.int64).fill_(-1)
        self.windows = GroupConfidenceWindows(num_slots, signals.max_window, device)
        self.workspace = Workspace()
        self.tp_group = tensor_parallel_group()  # all-reduces each step's results across TP ranks
        self.metrics = NoMetrics()  # the scheduler's Metrics with --enable-metrics
        # numeric parameters of each policy, one value per slot
        self.params: list[dict[str, torch.Tensor]] = []
        self.state: list[dict[str, torch.Tensor]] = []
        for name in self.policies:
            spec = registry.get(name).spec
            buffers = {}
            for field_name, info in spec.params.model_fields.items():
                dtype = _param_dtype(info.annotation)
                if dtype is not None:
                    buffers[field_name] = zeros(dtype)
            self.params.append(buffers)
            init_state = getattr(registry.policy(name), "init_state", None)
            self.state.append((init_state(num_slots, device) if init_state else None) or {})
        self.records: dict[str, RequestRecord] = {}
        # Requests that left their slot since the last consume: SGLang frees a finished
        # request's slot before it hands us the request's last token.
        self.ended: dict[str, RequestRecord] = {}
        # (rid, token index) -> rids of the children forked there (scheduler.branching), for the branch event
        self.children: dict[tuple[str, int], list[str]] = {}
        self.active_per_policy = [0] * len(self.policies)
        self.signal_users: Counter[str] = Counter()  # running requests that need each signal

    @property
    def num_active(self) -> int:
        return len(self.records)

    def report(self) -> dict:
        """Live state for ``/get_server_info`` (host reads, not in the decode step)."""
        return {
            "active_requests": self.num_active,
            "active_slots": int(self.active.sum()),
            "requests_per_policy": dict(zip(self.policies, self.active_per_policy, strict=True)),
        }

    # --- lifecycle (host, once per request) ----------------------------------------------

    def start(self, req, resolved: ResolvedRequest | None) -> None:
        """``req`` was given a slot; write its options (``resolved``) into the slot before its
        first step. A request this cannot serve as asked ends with an abort naming why (never
        served without its policy, never a scheduler crash)."""
        if req.rid in self.records:  # chunked prefill keeps its slot across chunks
            return
        if resolved is None or (resolved.policy is not None and resolved.policy not in self.policies):
            return  # nothing asked, or a policy of another path (speculative routing: scheduler.speculative)
        try:
            self._start(req, resolved)
        except Exception as e:
            logger.exception("request %s: the adapter could not start it", req.rid)
            self.end(req)
            self.active[req.kv.req_pool_idx] = False
            self.policy_index[req.kv.req_pool_idx] = -1
            req.to_finish = policy_failure(resolved.policy or "signals", e)
            self.metrics.failure(resolved.policy or "signals")

    def _start(self, req, resolved: ResolvedRequest) -> None:
        slot = req.kv.req_pool_idx
        self.active[slot] = True
        self.prompt_len[slot] = len(req.origin_input_ids)
        self.first_index[slot] = len(req.output_ids)
        self.confidence_k[slot] = resolved.confidence_k
        self.entropy_k[slot] = resolved.entropy_k
        self.window[slot] = resolved.window
        policy_index, info = -1, None
        signals = set(resolved.return_signals)
        if resolved.policy is not None:
            signals.update(self.registry.get(resolved.policy).spec.signals)
            policy_index = self.policies.index(resolved.policy)
            for field_name, buffer in self.params[policy_index].items():
                value = getattr(resolved.params, field_name)
                buffer[slot] = math.nan if value is None else value
        self.policy_index[slot] = policy_index
        record = RequestRecord(req.rid, slot, resolved, policy_index, None, frozenset(signals))
        self.records[req.rid] = record  # from here on ``end`` releases the slot
        self.signal_users.update(record.signals)
        if resolved.policy is not None:
            record.info = info = RequestInfo(
                rid=req.rid,
                slot=slot,
                policy=resolved.policy,
                params=resolved.params,
                group_id=resolved.params.group_id if isinstance(resolved.params, GroupParams) else None,
                prompt_tokens=len(req.origin_input_ids),
            )
            self.active_per_policy[policy_index] += 1
            try:
                start = getattr(self.registry.policy(resolved.policy), "request_start", None)
                if start:
                    start(info, self.state[policy_index])
            except Exception as e:
                logger.exception("policy %s failed to start request %s", resolved.policy, req.rid)
                req.to_finish = policy_failure(resolved.policy, e)
                self.metrics.failure(resolved.policy)
        req.customized_info = req.customized_info or {}
        for name in resolved.return_signals:
            req.customized_info.setdefault(SIGNAL_KEY + name, [])
        if resolved.policy is not None:
            req.customized_info.setdefault(EVENTS_KEY, [])

    def end(self, req) -> None:
        """``req`` leaves its slot (finished, aborted or retracted)."""
        record = self.records.pop(req.rid, None)
        if record is None:
            return
        self.ended[req.rid] = record
        self.signal_users.subtract(record.signals)
        self.active[record.slot] = False
        self.policy_index[record.slot] = -1
        if record.info is not None:
            self.active_per_policy[record.policy_index] -= 1
            end = getattr(self.registry.policy(record.info.policy), "request_end", None)
            try:
                if end:
                    end(record.info, _end_reason(req), self.state[record.policy_index])
            except Exception:  # the slot is released either way; SGLang must not see this
                logger.exception("policy %s failed to end request %s", record.info.policy, req.rid)

    # --- the decode step (device only) -----------------------------------------------------

    def step(self, logits: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor) -> "StepOutput":
        """Signals and decisions for a batch: logits [B, V], request slots [B], sequence lengths [B]."""
        slots = slots.long()
        token_index = seq_lens.long() - self.prompt_len[slots]  # [B] index of the token being sampled
        valid = self.active[slots] & (token_index >= 0)  # [B]; < 0: an unfinished prefill chunk
        write_slots = torch.where(valid, slots, torch.full_like(slots, SCRATCH_SLOT))  # [B]
        token_index = token_index.clamp(min=0)

        full_vocab = any(self.signal_users[name] > 0 for name in FULL_VOCAB_SIGNALS)
        signals = token_signals(logits, self.confidence_k[slots], self.entropy_k[slots], full_vocab, self.workspace)
        signals["group_confidence"], window_full = self.windows.update(
            write_slots, token_index, signals["confidence"], self.window[slots], self.first_index[slots]
        )

        decisions = Decisions.none(valid, slots)
        row_policy = self.policy_index[slots]  # [B]
        for index, name in enumerate(self.policies):
            if self.active_per_policy[index] == 0:
                continue
            step = DecodeStep(
                mask=valid & (row_policy == index),
                slots=write_slots,
                token_index=token_index,
                window_full=window_full,
                signals=signals,
                params={k: v[slots] for k, v in self.params[index].items()},
                state=self.state[index],
                logits=logits,
            )
            try:
                decisions.add(self.registry.policy(name).decode_step(step), step.mask, logits)
            except Exception as e:  # fail this policy's requests, not the server
                logger.exception("policy %s raised in decode_step", name)
                decisions.failures[index] = e
        packed, event_names, failures = decisions.pack(valid, token_index, signals)
        if self.tp_group is not None:
            # every TP rank runs the step on the same all-gathered logits, so their results agree
            # as far as their arithmetic does (SGLang's sampler assumes as much); one all-reduce of
            # the packed [B, C] results makes them equal bit for bit, so no rank stops or forks a
            # sequence another keeps (which would hang the next collective). On the device.
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX, group=self.tp_group)
        return StepOutput(packed, event_names, failures, runtime=self)


def tensor_parallel_group():
    """The TP group's device group when the model runs on several TP ranks, else None (one
    rank, or no groups at all: unit tests)."""
    from sglang.srt.distributed.parallel_state import get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized() or get_tp_group().world_size == 1:
        return None
    return get_tp_group().device_group


@dataclass
class Decisions:
    """The decisions of every policy for one step, merged row by row ([B] device tensors)."""

    stop: torch.Tensor  # [B] bool
    stop_reason: torch.Tensor  # [B] int64
    branch_width: torch.Tensor  # [B] int64
    event_columns: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B] float, NaN where unset
    failures: dict[int, Exception] = field(default_factory=dict)  # policy index -> what it raised

    @classmethod
    def none(cls, valid: torch.Tensor, slots: torch.Tensor) -> "Decisions":
        return cls(torch.zeros_like(valid), torch.zeros_like(slots), torch.zeros_like(slots))

    def add(self, decision, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """One policy's decision on its rows (``mask``); a logit bias applies to ``logits`` in place."""
        if decision is None:
            return
        if decision.stop is not None:
            stops_here = decision.stop & mask
            self.stop = self.stop | stops_here
            if decision.stop_reason is not None:
                self.stop_reason = torch.where(stops_here, decision.stop_reason.long(), self.stop_reason)
        if decision.branch_width is not None:
            self.branch_width = torch.where(mask, decision.branch_width.long(), self.branch_width)
        if decision.logit_bias is not None:
            logits.add_(torch.where(mask[:, None], decision.logit_bias, torch.zeros_like(decision.logit_bias)))
        for key, values in decision.event_values.items():
            previous = self.event_columns.get(key, torch.full_like(values, math.nan, dtype=torch.float32))
            self.event_columns[key] = torch.where(mask, values.float(), previous)

    def pack(self, valid, token_index, signals):
        """One [B, C] tensor for SGLang to copy to the host with the step's other outputs."""
        not_computed = torch.full_like(signals["confidence"], math.nan)
        columns = [
            valid,
            token_index,
            *(signals.get(n, not_computed) for n in SIGNAL_NAMES),
            self.stop,
            self.stop_reason,
            self.branch_width,
            *self.event_columns.values(),
        ]
        packed = torch.stack([c.float() for c in columns], dim=1)  # [B, C]
        return packed, tuple(self.event_columns), self.failures


@dataclass(frozen=True)
class StepOutput:
    """Device side of one step's results (SGLang's ``DeviceAuxiliaryOutput``)."""

    packed: torch.Tensor  # [B, len(FIXED_COLUMNS) + len(event_names)] float32
    event_names: tuple[str, ...]
    failures: dict[int, Exception]  # policy index -> what it raised in this step
    runtime: "EntropyRuntime"  # whose requests the rows are

    def copy_to_host(self, copy_tensor: Callable[[torch.Tensor], torch.Tensor]) -> "HostStepOutput":
        return HostStepOutput(copy_tensor(self.packed), self.event_names, self.failures, self.runtime)


@dataclass
class HostStepOutput:
    """Host side of one step's results (SGLang's ``HostAuxiliaryOutput``)."""

    packed: torch.Tensor
    event_names: tuple[str, ...]
    failures: dict[int, Exception]
    runtime: "EntropyRuntime"
    _rows: Optional[list] = field(default=None, repr=False)

    def rows(self) -> list[dict[str, float]]:
        """One dict per batch row. A host tensor: SGLang has already waited for the copy."""
        if self._rows is None:
            names = (*FIXED_COLUMNS, *self.event_names)
            self._rows = [dict(zip(names, row, strict=True)) for row in self.packed.tolist()]
        return self._rows

    def stops(self, batch) -> None:
        """Mark the requests whose policy said stop, before SGLang commits their token."""
        runtime = self.runtime
        for req, row in zip(batch.reqs, self.rows(), strict=True):
            record = runtime.records.get(req.rid)
            if record is None or record.info is None or req.finished() or not row["valid"]:
                continue
            if record.policy_index in self.failures:
                req.to_finish = policy_failure(record.info.policy, self.failures[record.policy_index])
                runtime.metrics.failure(record.info.policy)
                continue
            if not row["stop"]:
                continue
            try:
                reason = _stop_reason(runtime, record, row)
            except IndexError as e:  # the policy gave a reason it did not register
                req.to_finish = policy_failure(record.info.policy, e)
                runtime.metrics.failure(record.info.policy)
                continue
            req.to_finish = EntropyStop(record.info.policy, reason, int(row["token_index"]))
            max_new_tokens = getattr(req.sampling_params, "max_new_tokens", None) or 0
            tokens_left = max_new_tokens - int(row["token_index"]) - 1
            runtime.metrics.stop(record.info.policy, reason, tokens_left)

    def consume(self, batch, commits: Sequence) -> None:
        """After SGLang committed the step's tokens: their values and events go into each
        request's ``customized_info``. A row that cannot be recorded fails its own request."""
        runtime = self.runtime
        tokens_per_policy: Counter[str] = Counter()  # one metrics update per policy and step
        for req, row, commit in zip(batch.reqs, self.rows(), commits, strict=True):
            if commit is None or not row["valid"]:
                continue
            record = runtime.records.get(req.rid) or runtime.ended.get(req.rid)
            if record is None:
                continue
            try:
                _record_token(req, record, row, commit.output_index, self.event_names, runtime)
            except Exception as e:
                logger.exception("request %s: recording its token failed", req.rid)
                if not req.finished():
                    req.to_finish = policy_failure(record.resolved.policy or "signals", e)
                    runtime.metrics.failure(record.resolved.policy or "signals")
                continue
            if record.info is not None:
                tokens_per_policy[record.info.policy] += 1
        for policy, count in tokens_per_policy.items():
            runtime.metrics.tokens(policy, count)
        runtime.ended.clear()


def _record_token(req, record: RequestRecord, row: dict, index: int, event_names, runtime) -> None:
    info = req.customized_info
    for name in record.resolved.return_signals:
        put_token_value(info[SIGNAL_KEY + name], index, row[name])
    if record.info is not None:
        events = _events(record, row, event_names, runtime)
        put_token_value(info[EVENTS_KEY], index, events or None)


def _events(record: RequestRecord, row: dict, event_names, runtime) -> list[dict]:
    events = []
    extra = {k: row[k] for k in event_names if not math.isnan(row[k])}
    if row["stop"]:
        events.append(
            {
                "kind": "stop",
                "token_index": int(row["token_index"]),
                "policy": record.info.policy,
                "reason": _stop_reason(runtime, record, row),
                **extra,
            }
        )
    if row["branch_width"] > 0:
        children = runtime.children.pop((record.rid, int(row["token_index"])), [])
        events.append(
            {
                "kind": "branch",
                "token_index": int(row["token_index"]),
                "policy": record.info.policy,
                "width": int(row["branch_width"]),
                "applied": bool(children),
                "children": children,
                **extra,
            }
        )
    return events


def _stop_reason(runtime: EntropyRuntime, record: RequestRecord, row: dict) -> str:
    return runtime.registry.get(record.info.policy).spec.stop_reasons[int(row["stop_reason"])]


def _end_reason(req) -> str:
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    if isinstance(req.finished_reason, FINISH_ABORT):
        return "aborted"
    if req.finished():
        return "finished"
    return "retracted" if req.is_retracted else "aborted"


# --- the observer SGLang calls ---------------------------------------------------------------


class EntropyObserver:
    """SGLang ``SamplingObserver``: runs the step on the batch's next-token logits."""

    def __init__(self, runtime: EntropyRuntime):
        self.runtime = runtime
        self.forward_batch = None  # set by the ModelRunner.sample hook for the current call
        self.failure: Exception | None = None  # an error of the step, for the batch's requests

    def is_active(self, sampling_info) -> bool:
        return self.runtime.num_active > 0 and self.forward_batch is not None

    def before_grammar(self, logits: torch.Tensor, sampling_info) -> StepOutput | None:
        batch = self.forward_batch
        rows = logits.shape[0]
        try:
            return self.runtime.step(logits, batch.req_pool_indices[:rows], batch.seq_lens[:rows])
        except Exception as e:  # fail the requests that use the adapter, keep the server
            logger.exception("the entropy step failed")
            self.failure = e
            return None

    def after_sample(self, state: StepOutput, token_ids: torch.Tensor) -> StepOutput:
        return state


def abort_after_step_failure(observer: EntropyObserver, batch) -> None:
    """The step raised (see ``EntropyObserver.before_grammar``): end this batch's requests
    that use the adapter, with the error as their abort message."""
    error, observer.failure = observer.failure, None
    runtime = observer.runtime
    for req in batch.reqs:
        record = runtime.records.get(req.rid)
        if record is not None and not req.finished():
            req.to_finish = policy_failure(record.resolved.policy or "signal step", error)
            runtime.metrics.failure(record.resolved.policy or "signal step")


def find_host_output(result) -> HostStepOutput | None:
    output = getattr(result, "auxiliary_host_output", None)
    for candidate in getattr(output, "outputs", (output,)):
        if isinstance(candidate, HostStepOutput):
            return candidate
    return None
