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

FIXED_COLUMNS = ("valid", "token_index", *SIGNAL_NAMES, "stop", "stoppers", "branch_width", "brancher")
SCRATCH_SLOT = 0  # SGLang's request pool keeps row 0 as padding; rows that must not write go here
# Steps whose fork points are kept per slot: SGLang's overlap scheduler runs the next step on the
# device before the host forks the last one, so a fork reads the state kept at its own step.
FORK_RING = 4


@dataclass
class RequestRecord:
    """Host-side state of one running request that asked for signals or policies."""

    rid: str
    slot: int
    resolved: ResolvedRequest
    policy_indices: tuple[int, ...]  # its policies' indices in ``EntropyRuntime.policies``, primary first
    infos: tuple[RequestInfo, ...]  # what each policy's lifecycle methods see, in the same order
    signals: frozenset[str]  # signals this request or its policies read


@dataclass(frozen=True)
class Inheritance:
    """What a sequence forked by a branching policy takes over from its parent, copied on the
    device at the fork: the parent's rows as they were before the token it forked at, which the
    child samples again as its first token."""

    offset: torch.Tensor  # [] int64: the parent's window index of the child's first token
    first_window_index: torch.Tensor  # [] int64: the parent's first window index in its slot
    window: torch.Tensor  # [max_window] float32: the parent's group-confidence ring buffer
    state: dict[int, dict[str, torch.Tensor]]  # policy index -> the parent's row of each state buffer


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
        # A slot's window index of output token i is offset + i: a forked child continues its
        # parent's window (offset = the parent's index of the child's first token), others use 0.
        self.offset = zeros(torch.int64)
        self.first_window_index = zeros(torch.int64)  # first window index this slot writes (> 0 after a retraction)
        self.confidence_k = zeros(torch.int64).fill_(signals.confidence_top_k)
        self.entropy_k = zeros(torch.int64).fill_(signals.entropy_top_k)
        self.window = zeros(torch.int64).fill_(signals.window_size)
        self.member = torch.zeros(num_slots, max(1, len(self.policies)), dtype=torch.bool, device=device)  # [S, P]
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
        # the window and state rows of each slot at its last FORK_RING steps that asked to fork
        # (index: token index % FORK_RING); only while a branching policy is enabled
        self.branching = [i for i, name in enumerate(self.policies) if registry.get(name).spec.branches]
        ring = FORK_RING if self.branching else 0
        self.fork_windows = torch.zeros(num_slots, ring, signals.max_window, device=device)  # [S, R, W]
        self.fork_states = [
            {name: torch.zeros(num_slots, ring, *b.shape[1:], dtype=b.dtype, device=device) for name, b in st.items()}
            for st in self.state
        ]  # per policy: name -> [S, R, ...]
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

    def start(self, req, resolved: ResolvedRequest | None, inherit: Inheritance | None = None) -> None:
        """``req`` was given a slot; write its options (``resolved``) into the slot before its
        first step (and, for a forked sequence, its parent's state: ``inherit``). A request
        this cannot serve as asked ends with an abort naming why (never served without its
        policies, never a scheduler crash)."""
        if req.rid in self.records:  # chunked prefill keeps its slot across chunks
            return
        if resolved is None or any(p not in self.policies for p in resolved.policies):
            return  # nothing asked, or a policy of another path (speculative routing: scheduler.speculative)
        try:
            self._start(req, resolved, inherit)
        except Exception as e:
            logger.exception("request %s: the adapter could not start it", req.rid)
            self.end(req)
            self.active[req.kv.req_pool_idx] = False
            self.member[req.kv.req_pool_idx] = False
            req.to_finish = policy_failure(resolved.policy or "signals", e)
            self.metrics.failure(resolved.policy or "signals")

    def _start(self, req, resolved: ResolvedRequest, inherit: Inheritance | None) -> None:
        slot = req.kv.req_pool_idx
        self.active[slot] = True
        self.prompt_len[slot] = len(req.origin_input_ids)
        self.offset[slot] = 0
        self.first_window_index[slot] = len(req.output_ids)
        self.confidence_k[slot] = resolved.confidence_k
        self.entropy_k[slot] = resolved.entropy_k
        self.window[slot] = resolved.window
        self.member[slot] = False
        indices = tuple(self.policies.index(name) for name in resolved.policies)
        signals = set(resolved.return_signals)
        for (name, params), index in zip(resolved.composed, indices, strict=True):
            signals.update(self.registry.get(name).spec.signals)
            self.member[slot, index] = True
            for field_name, buffer in self.params[index].items():
                value = getattr(params, field_name)
                buffer[slot] = math.nan if value is None else value
        infos = tuple(
            RequestInfo(
                rid=req.rid,
                slot=slot,
                policy=name,
                params=params,
                group_id=params.group_id if isinstance(params, GroupParams) else None,
                prompt_tokens=len(req.origin_input_ids),
            )
            for name, params in resolved.composed
        )
        record = RequestRecord(req.rid, slot, resolved, indices, infos, frozenset(signals))
        self.records[req.rid] = record  # from here on ``end`` releases the slot
        self.signal_users.update(record.signals)
        for index, info in zip(indices, infos, strict=True):
            self.active_per_policy[index] += 1
            try:
                start = getattr(self.registry.policy(info.policy), "request_start", None)
                if start:
                    start(info, self.state[index])
            except Exception as e:
                logger.exception("policy %s failed to start request %s", info.policy, req.rid)
                req.to_finish = policy_failure(info.policy, e)
                self.metrics.failure(info.policy)
        if inherit is not None:
            self._inherit(slot, inherit, len(req.output_ids), indices)
        req.customized_info = req.customized_info or {}
        for name in resolved.return_signals:
            req.customized_info.setdefault(SIGNAL_KEY + name, [])
        if infos:
            req.customized_info.setdefault(EVENTS_KEY, [])

    def _inherit(self, slot: int, inherit: Inheritance, tokens_so_far: int, indices) -> None:
        """A forked sequence continues its parent: its window indices follow the parent's, its
        first start takes over the parent's window and state rows (after ``request_start``).
        Re-admitted after a retraction, it keeps the offset and counts its window again from
        there, like any retracted request."""
        self.offset[slot] = inherit.offset
        if tokens_so_far > 0:
            self.first_window_index[slot] = inherit.offset + tokens_so_far
            return
        self.first_window_index[slot] = inherit.first_window_index
        self.windows.values[slot] = inherit.window
        for index in indices:
            for name, row in inherit.state.get(index, {}).items():
                self.state[index][name][slot] = row

    def fork_state(self, record: RequestRecord, token_index: int) -> Inheritance:
        """What a child forked from ``record``'s request at output ``token_index`` inherits:
        device copies of the parent's rows as kept at that step (host thread, no sync)."""
        slot, ring = record.slot, token_index % FORK_RING
        return Inheritance(
            offset=self.offset[slot] + token_index,
            first_window_index=self.first_window_index[slot].clone(),
            window=self.fork_windows[slot, ring].clone(),
            state={
                index: {name: kept[slot, ring].clone() for name, kept in self.fork_states[index].items()}
                for index in record.policy_indices
            },
        )

    def end(self, req) -> None:
        """``req`` leaves its slot (finished, aborted or retracted)."""
        record = self.records.pop(req.rid, None)
        if record is None:
            return
        self.ended[req.rid] = record
        self.signal_users.subtract(record.signals)
        self.active[record.slot] = False
        self.member[record.slot] = False
        for index, info in zip(record.policy_indices, record.infos, strict=True):
            self.active_per_policy[index] -= 1
            end = getattr(self.registry.policy(info.policy), "request_end", None)
            try:
                if end:
                    end(info, _end_reason(req), self.state[index])
            except Exception:  # the slot is released either way; SGLang must not see this
                logger.exception("policy %s failed to end request %s", info.policy, req.rid)

    # --- the decode step (device only) -----------------------------------------------------

    def step(self, logits: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor) -> "StepOutput":
        """Signals and decisions for a batch: logits [B, V], request slots [B], sequence lengths [B]."""
        slots = slots.long()
        token_index = seq_lens.long() - self.prompt_len[slots]  # [B] index of the token being sampled
        valid = self.active[slots] & (token_index >= 0)  # [B]; < 0: an unfinished prefill chunk
        write_slots = torch.where(valid, slots, torch.full_like(slots, SCRATCH_SLOT))  # [B]
        token_index = token_index.clamp(min=0)

        # a child forked at this token samples it again, so it takes the rows as they are before it
        branching = any(self.active_per_policy[i] for i in self.branching)
        before = self._rows(write_slots) if branching else None
        full_vocab = any(self.signal_users[name] > 0 for name in FULL_VOCAB_SIGNALS)
        signals = token_signals(logits, self.confidence_k[slots], self.entropy_k[slots], full_vocab, self.workspace)
        signals["group_confidence"], window_full = self.windows.update(
            write_slots,
            token_index + self.offset[slots],
            signals["confidence"],
            self.window[slots],
            self.first_window_index[slots],
        )

        decisions = Decisions.none(valid, slots)
        member = self.member[slots]  # [B, P]
        for index, name in enumerate(self.policies):
            if self.active_per_policy[index] == 0:
                continue
            step = DecodeStep(
                mask=valid & member[:, index],
                slots=write_slots,
                token_index=token_index,
                window_full=window_full,
                signals=signals,
                params={k: v[slots] for k, v in self.params[index].items()},
                state=self.state[index],
                logits=logits,
            )
            try:
                decisions.add(index, self.registry.policy(name).decode_step(step), step.mask, logits)
            except Exception as e:  # fail this policy's requests, not the server
                logger.exception("policy %s raised in decode_step", name)
                decisions.failures[index] = e
        if branching:
            self._keep_fork_points(write_slots, token_index, decisions.branch_width > 0, before)
        packed, event_names, failures = decisions.pack(valid, token_index, signals)
        if self.tp_group is not None:
            # every TP rank runs the step on the same all-gathered logits, so their results agree
            # as far as their arithmetic does (SGLang's sampler assumes as much); one all-reduce of
            # the packed [B, C] results makes them equal bit for bit, so no rank stops or forks a
            # sequence another keeps (which would hang the next collective). On the device.
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX, group=self.tp_group)
        return StepOutput(packed, event_names, failures, runtime=self)

    def _rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Copies of the window [B, W] and every policy's state rows [B, ...] of ``slots`` (device)."""
        state_rows = [{name: buffer[slots] for name, buffer in state.items()} for state in self.state]
        return self.windows.values[slots], state_rows

    def _keep_fork_points(self, slots: torch.Tensor, token_index: torch.Tensor, forking: torch.Tensor, before) -> None:
        """Keep the rows ``before`` this step of the rows that ask to fork ([B] each), at ring index
        token_index % FORK_RING, for ``fork_state`` to copy once the host has forked (device)."""
        ring = token_index % FORK_RING  # [B]
        window_before, state_before = before
        kept = self.fork_windows[slots, ring]  # [B, W]
        self.fork_windows[slots, ring] = torch.where(forking[:, None], window_before, kept)
        for rows, fork_state in zip(state_before, self.fork_states, strict=True):
            for name, row in rows.items():
                kept = fork_state[name][slots, ring]  # [B, ...]
                fork_state[name][slots, ring] = torch.where(forking.view(-1, *[1] * (row.dim() - 1)), row, kept)


def tensor_parallel_group():
    """The TP group's device group when the model runs on several TP ranks, else None (one
    rank, or no groups at all: unit tests)."""
    from sglang.srt.distributed.parallel_state import get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized() or get_tp_group().world_size == 1:
        return None
    return get_tp_group().device_group


@dataclass
class Decisions:
    """The decisions of every policy for one step, merged row by row ([B] device tensors).

    The merge rule of a request with several policies: it stops if any of them stops (each
    stopping policy is a bit of ``stoppers`` and keeps its own reason and event values), it
    forks the largest width any of them asks for (``brancher``: whose), logit biases add."""

    stop: torch.Tensor  # [B] bool
    stoppers: torch.Tensor  # [B] int64, bit p set: policy p stopped the row
    branch_width: torch.Tensor  # [B] int64
    brancher: torch.Tensor  # [B] int64, the policy whose width is branch_width (-1: none)
    reasons: dict[int, torch.Tensor] = field(default_factory=dict)  # policy index -> [B] int64 stop reason
    event_columns: dict[str, torch.Tensor] = field(default_factory=dict)  # "p/name" -> [B] float, NaN where unset
    failures: dict[int, Exception] = field(default_factory=dict)  # policy index -> what it raised

    @classmethod
    def none(cls, valid: torch.Tensor, slots: torch.Tensor) -> "Decisions":
        zeros = torch.zeros_like(slots)
        return cls(torch.zeros_like(valid), zeros, zeros, torch.full_like(slots, -1))

    def add(self, index: int, decision, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Policy ``index``'s decision on its rows (``mask``); a logit bias applies to ``logits`` in place."""
        if decision is None:
            return
        if decision.stop is not None:
            stops_here = decision.stop & mask  # [B]
            self.stop = self.stop | stops_here
            self.stoppers = self.stoppers | (stops_here.long() << index)
            if decision.stop_reason is not None:
                self.reasons[index] = torch.where(stops_here, decision.stop_reason.long(), 0)
        if decision.branch_width is not None:
            width = torch.where(mask, decision.branch_width.long(), 0)  # [B]
            wider = width > self.branch_width
            self.branch_width = torch.where(wider, width, self.branch_width)
            self.brancher = torch.where(wider, index, self.brancher)
        if decision.logit_bias is not None:
            logits.add_(torch.where(mask[:, None], decision.logit_bias, torch.zeros_like(decision.logit_bias)))
        for key, values in decision.event_values.items():
            self.event_columns[f"{index}/{key}"] = torch.where(mask, values.float(), math.nan)

    def pack(self, valid, token_index, signals):
        """One [B, C] tensor for SGLang to copy to the host with the step's other outputs."""
        not_computed = torch.full_like(signals["confidence"], math.nan)
        reason_columns = {f"reason/{index}": reason for index, reason in self.reasons.items()}
        columns = [
            valid,
            token_index,
            *(signals.get(n, not_computed) for n in SIGNAL_NAMES),
            self.stop,
            self.stoppers,
            self.branch_width,
            self.brancher,
            *reason_columns.values(),
            *self.event_columns.values(),
        ]
        packed = torch.stack([c.float() for c in columns], dim=1)  # [B, C]
        return packed, (*reason_columns, *self.event_columns), self.failures


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
        """Mark the requests whose policies said stop, before SGLang commits their token."""
        runtime = self.runtime
        for req, row in zip(batch.reqs, self.rows(), strict=True):
            record = runtime.records.get(req.rid)
            if record is None or not record.infos or req.finished() or not row["valid"]:
                continue
            failed = [i for i in record.policy_indices if i in self.failures]
            if failed:
                policy = runtime.policies[failed[0]]
                req.to_finish = policy_failure(policy, self.failures[failed[0]])
                runtime.metrics.failure(policy)
                continue
            if not row["stop"]:
                continue
            try:
                stopped = {policy: reason for _, policy, reason in _stops(runtime, record, row)}
            except UnregisteredReason as e:
                req.to_finish = policy_failure(e.policy, e.__cause__)
                runtime.metrics.failure(e.policy)
                continue
            req.to_finish = EntropyStop(stopped, int(row["token_index"]))
            max_new_tokens = getattr(req.sampling_params, "max_new_tokens", None) or 0
            tokens_left = max_new_tokens - int(row["token_index"]) - 1
            for policy, reason in stopped.items():
                runtime.metrics.stop(policy, reason, tokens_left)

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
            for info in record.infos:
                tokens_per_policy[info.policy] += 1
        for policy, count in tokens_per_policy.items():
            runtime.metrics.tokens(policy, count)
        runtime.ended.clear()


def _record_token(req, record: RequestRecord, row: dict, index: int, event_names, runtime) -> None:
    info = req.customized_info
    for name in record.resolved.return_signals:
        put_token_value(info[SIGNAL_KEY + name], index, row[name])
    if record.infos:
        events = _events(record, row, event_names, runtime)
        put_token_value(info[EVENTS_KEY], index, events or None)


def _events(record: RequestRecord, row: dict, event_names, runtime) -> list[dict]:
    """The stop event of each policy that stopped the row and the branch event of the one that
    forked it, each with its own policy's event values."""
    events = []
    index = int(row["token_index"])
    if row["stop"]:
        for policy_index, policy, reason in _stops(runtime, record, row):
            event = {"kind": "stop", "token_index": index, "policy": policy, "reason": reason}
            events.append({**event, **_values(row, event_names, policy_index)})
    if row["branch_width"] > 0:
        brancher = int(row["brancher"])
        children = runtime.children.pop((record.rid, index), [])
        event = {
            "kind": "branch",
            "token_index": index,
            "policy": runtime.policies[brancher],
            "width": int(row["branch_width"]),
            "applied": bool(children),
            "children": children,
        }
        events.append({**event, **_values(row, event_names, brancher)})
    return events


def _values(row: dict, event_names, policy_index: int) -> dict[str, float]:
    prefix = f"{policy_index}/"
    return {k[len(prefix) :]: row[k] for k in event_names if k.startswith(prefix) and not math.isnan(row[k])}


def _stops(runtime: EntropyRuntime, record: RequestRecord, row: dict) -> list[tuple[int, str, str]]:
    """(policy index, policy, stop reason) of each of the request's policies that stopped the
    row, in the request's order (raises UnregisteredReason naming the policy that gave one)."""
    bits = int(row["stoppers"])
    stops = []
    for index in (i for i in record.policy_indices if bits >> i & 1):
        spec = runtime.registry.get(runtime.policies[index]).spec
        try:
            stops.append((index, spec.name, spec.stop_reasons[int(row.get(f"reason/{index}", 0))]))
        except IndexError as e:
            raise UnregisteredReason(spec.name, e) from e
    return stops


class UnregisteredReason(Exception):
    """A policy's stop decision indexed a reason its spec does not register (the IndexError is
    the cause); ``policy`` names which policy of the request it was."""

    def __init__(self, policy: str, error: IndexError):
        super().__init__(policy, error)
        self.policy = policy


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
