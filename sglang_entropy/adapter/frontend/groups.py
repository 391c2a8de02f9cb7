"""Groups of traces, for policies registered with ``groups=True`` (e.g. DeepConf's warm-up
calibration and consensus stop): a request with ``n`` > 1, or requests whose parameters share
a ``group_id``.

The traces of a group meet here, in the HTTP server process (TokenizerManager.generate_request).
Each trace goes to the scheduler as its own request, rid ``<request rid>-<i>``, whose
parameters carry the group's overrides so far (e.g. the calibrated threshold). With
``warmup_traces`` W in the parameters, the first W traces start at once and the others wait
until those have finished; a warm-up trace that is aborted hands its place to a waiting one.
After each finished trace the policy's ``group_trace_finished`` may change the parameters of
traces not yet started, or stop the group: its running traces are aborted and no more start.
Groups named by ``group_id`` outlive their requests (up to ``[limits] max_groups`` of them
are kept, each with its finished traces' per-token signals) so that later requests join them;
a group of one ``n`` > 1 request ends with it.

Group names are private to a client: a ``group_id`` or ``budget_group`` is keyed by the
client's scope (a digest of the HTTP header ``[groups] client_header``), so another client
naming the same group gets its own. At most ``[limits] max_groups`` named groups and budget
groups are in use at once; beyond that a request naming a new group gets a 400, and groups
nobody uses are forgotten, least recently used first.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import logging
import uuid
from collections import Counter, OrderedDict

from sglang_entropy.adapter.frontend.sequences import MergedSequences, SequenceOutputs, stream_mode
from sglang_entropy.adapter.metrics import NoMetrics
from sglang_entropy.registry import installed_policies
from sglang_entropy.settings import (
    REQUEST_KEY,
    EntropyRequestError,
    GroupScope,
    Limits,
    ResolvedRequest,
    set_primary_params,
)
from sglang_entropy.types import TraceGroup, TraceSummary

logger = logging.getLogger(__name__)

NOT_STARTED = "the group was stopped before this trace started"


class Group:
    def __init__(self, group_id: str, policy: str, params):
        self.view = TraceGroup(group_id=group_id, policy=policy, params=params)
        self.warmup = params.warmup_traces
        self.warmup_started = 0
        self.warmup_done = 0
        self.stopped = False
        self.running: set[str] = set()  # rids of traces in the scheduler
        self.requests = 0  # requests of this group in flight
        self.changed = asyncio.Condition()

    async def admit(self) -> str | None:
        """Wait for this trace's turn: "warmup", "calibrated" (after the warm-up) or None
        when the group was stopped."""
        async with self.changed:
            while True:
                if self.stopped:
                    return None
                if self.warmup_started < self.warmup:
                    self.warmup_started += 1
                    return "warmup"
                if self.warmup_done >= self.warmup:
                    return "calibrated"
                await self.changed.wait()

    async def release(self, role: str | None, aborted: bool) -> None:
        async with self.changed:
            if role == "warmup":
                if aborted:
                    self.warmup_started -= 1  # a waiting trace takes its place
                else:
                    self.warmup_done += 1
            self.changed.notify_all()


class GroupBook:
    """The HTTP server process's groups: named groups (by client-scoped key), the traces of the
    group requests in flight, and the budget groups in use. At most ``[limits] max_groups``
    named and budget groups are in use at once; idle named groups beyond that are forgotten,
    least recently used first."""

    def __init__(self, limits: Limits, metrics=None):
        self.limits = limits
        self.metrics = metrics or NoMetrics()
        self.named: OrderedDict[str, Group] = OrderedDict()  # policy:scoped key -> group, least recent first
        self.requests: dict[str, tuple[Group, list[str]]] = {}  # request rid -> its group and trace rids
        self.budgets: Counter[str] = Counter()  # scoped budget group -> requests in flight

    def in_use(self) -> int:
        return sum(1 for group in self.named.values() if group.requests) + len(self.budgets)

    def _admit_name(self, in_use: bool, field: str) -> None:
        if not in_use and self.in_use() >= self.limits.max_groups:
            raise EntropyRequestError(
                f"custom_params.{REQUEST_KEY}.params.{field}: {self.limits.max_groups} named groups are in use "
                "on this server ([limits] max_groups); try again when one has finished"
            )

    def named_group(self, key: str, group_id: str, policy: str, params) -> Group:
        """The client's group ``group_id`` (``key`` is its scoped name)."""
        key = f"{policy}:{key}"
        group = self.named.get(key)
        self._admit_name(group is not None and group.requests > 0, "group_id")
        if group is None:
            group = self.named[key] = Group(group_id, policy, params)
        self.named.move_to_end(key)
        idle = [k for k, g in self.named.items() if not g.requests and k != key]
        for stale in idle[: max(0, len(self.named) - self.limits.max_groups)]:
            del self.named[stale]
        return group

    @contextlib.asynccontextmanager
    async def budget_group(self, obj, options: ResolvedRequest, scope: str, ranks: int = 1):
        """A branching request that names a ``budget_group``: the scheduler keys the shared
        budget by the client-scoped name, which replaces the client's name in the request.
        Budgets live in a scheduler, so with ``ranks`` > 1 data-parallel ranks every request of
        the group is pinned to one rank, chosen by the name."""
        name = options.params.budget_group
        if name is None:
            yield
            return
        key = scoped_name(scope, name)
        if ranks > 1:
            rank = int(key[:8], 16) % ranks
            if getattr(obj, "routed_dp_rank", None) not in (None, rank):
                raise EntropyRequestError(
                    f"routed_dp_rank: the requests of this budget_group run on data-parallel rank {rank}, where "
                    "their shared budget is kept"
                )
            obj.routed_dp_rank = rank
        self._admit_name(key in self.budgets, "budget_group")
        custom = dict(obj.sampling_params.get("custom_params") or {})
        custom[REQUEST_KEY] = set_primary_params(custom[REQUEST_KEY], options.policy, {"budget_group": key})
        obj.sampling_params = {**obj.sampling_params, "custom_params": custom}
        self.budgets[key] += 1
        try:
            yield
        finally:
            self.budgets[key] -= 1
            if self.budgets[key] <= 0:
                del self.budgets[key]

    def abort(self, original, tokenizer_manager, rid: str = "", abort_all: bool = False):
        """TokenizerManager.abort_request: a group request's rid aborts all its traces."""
        entry = self.requests.get(rid) if not abort_all else None
        if entry is None:
            return original(tokenizer_manager, rid=rid, abort_all=abort_all)
        group, rids = entry
        if group.view.params.group_id is None:  # the request's own group: start nothing more
            group.stopped = True
        for trace_rid in rids:
            original(tokenizer_manager, rid=trace_rid)


def client_scope(request, scope: GroupScope, field: str, params) -> str:
    """The client's scope for the group names in ``params`` (raises EntropyRequestError when
    the server requires the client header and the request has none)."""
    value = request.headers.get(scope.client_header) if request is not None else None
    if value is None and scope.require_client_header and getattr(params, field, None) is not None:
        raise EntropyRequestError(
            f"custom_params.{REQUEST_KEY}.params.{field}: this server scopes group names by client and needs "
            f"the {scope.client_header!r} header"
        )
    return hashlib.sha256((value or "").encode()).hexdigest()[:32]


def scoped_name(scope: str, name: str) -> str:
    """The name the server keys a client's group by (64 hex digits, so it fits a name field)."""
    return hashlib.sha256(f"{scope}\0{name}".encode()).hexdigest()


def forms_group(options: ResolvedRequest | None, n: int) -> bool:
    """Whether one prompt's request is a group: its policy runs groups and it asks for
    ``n`` > 1 traces or names a ``group_id``."""
    if options is None or options.policy is None:
        return False
    spec = installed_policies().get(options.policy).spec
    return spec.groups and (n > 1 or options.params.group_id is not None)


def check_group_form(single_prompt: bool) -> None:
    """A request that runs several sequences (a group of traces, or a branching policy) takes
    one prompt with one set of sampling parameters (raises EntropyRequestError)."""
    if not single_prompt:
        raise EntropyRequestError(
            f"custom_params.{REQUEST_KEY}: a request of several sequences (a group: n > 1 or group_id; or a "
            "branching policy) takes one prompt and one set of sampling_params"
        )


def is_group_request(resolved: list[ResolvedRequest | None], n: int) -> bool:
    """Whether a /generate request (whose form ``check_group_form`` accepted) is a group."""
    return len(resolved) == 1 and forms_group(resolved[0], n)


async def run(original, tokenizer_manager, obj, request, options: ResolvedRequest, n: int, scope: str, book):
    """Run a group request of ``n`` traces; yields what ``generate_request`` would: one output,
    or a list of ``n`` outputs, each with ``meta_info["entropy"]["group"]``; when the request
    streams, each trace's outputs as they come, marked with the trace's ``index``, the group's
    vote in the last one."""
    params = options.params
    request_rid = obj.rid if isinstance(obj.rid, str) else uuid.uuid4().hex
    group_id = params.group_id
    if group_id is not None:
        group = book.named_group(scoped_name(scope, group_id), group_id, options.policy, params)
    else:
        group = Group(request_rid[:128], options.policy, params)
    rids = [f"{request_rid}-{i}" for i in range(n)]
    book.requests[request_rid] = (group, rids)
    group.requests += 1
    mode = stream_mode(obj, tokenizer_manager)
    traces = MergedSequences()
    for index, rid in enumerate(rids):
        trace = _trace(original, tokenizer_manager, obj, request, options, group, rid, book.metrics, mode)
        traces.start(index, trace)
    finals: dict[int, dict] = {}
    complete = False
    try:
        async with contextlib.aclosing(traces.items()) as items:
            async for output, final in items:
                if final:
                    finals[output["index"]] = output
                    if obj.stream and len(finals) == n:
                        _add_vote([output], group, options)
                if obj.stream:
                    yield output
        complete = True
    finally:
        if not complete:  # failed or cancelled: no trace of the request may run on
            for rid in rids:
                if rid in group.running:
                    tokenizer_manager.abort_request(rid)
        book.requests.pop(request_rid, None)
        group.requests -= 1
    if not obj.stream:
        outputs = [finals[index] for index in range(n)]
        for output in outputs:
            del output["index"]
        _add_vote(outputs, group, options)
        yield outputs if n > 1 else outputs[0]


def _add_vote(outputs: list[dict], group: Group, options: ResolvedRequest) -> None:
    vote_of = getattr(installed_policies().policy(options.policy), "group_vote", None)
    vote = vote_of(group.view) if vote_of else None
    for output in outputs:
        output["meta_info"]["entropy"]["group"]["vote"] = dataclasses.asdict(vote) if vote is not None else None


async def _trace(original, tokenizer_manager, obj, request, options, group: Group, rid: str, metrics, mode):
    """One trace of a group: wait for its turn, run it with the group's parameters so far, and
    hand the finished trace to the policy's group method. Yields ``(output, final)``: the
    trace's outputs with the values new in each (one output unless the request streams)."""
    role = await group.admit()
    if role is None:
        yield _not_started(rid, group, options), True
        return
    sub, trace_params = _trace_request(obj, rid, options, group)
    about = {"id": group.view.group_id, "role": role, "threshold": trace_params.get("threshold")}
    sequence = SequenceOutputs(options.label, mode)
    group.running.add(rid)
    aborted = True
    last = None
    try:
        async with contextlib.aclosing(original(tokenizer_manager, sub, request)) as outputs:
            async for output in outputs:
                if last is not None:
                    yield _client_view(last, options, about), False
                sequence.shape(output)
                last = output
        finish = last["meta_info"].get("finish_reason") or {}
        aborted = finish.get("type") == "abort"
        if not aborted:
            _trace_finished(last, sequence, role, group, options, tokenizer_manager, metrics)
    finally:
        group.running.discard(rid)
        await group.release(role, aborted)
    yield _client_view(last, options, about), True


def _client_view(output: dict, options: ResolvedRequest, about: dict) -> dict:
    """The output as the client sees it: the signals it asked for (a trace also returns those
    the group methods read) and the trace's place in the group."""
    entropy = output["meta_info"]["entropy"]
    entropy["signals"] = {name: v for name, v in entropy["signals"].items() if name in options.return_signals}
    entropy["group"] = dict(about)
    return output


def _trace_request(obj, rid: str, options: ResolvedRequest, group: Group):
    """The request of one trace (``n`` = 1) with the group's parameters so far, and those
    parameters. It returns the signals the group methods read besides those the client asked for."""
    trace_params = {
        **options.params.model_dump(exclude_none=True),
        **group.view.overrides,
        "group_id": group.view.group_id,
    }
    specs = [installed_policies().get(name).spec for name in options.policies]
    returned = [s for spec in specs for s in spec.signals if s != "group_confidence"]
    entropy = {"return_signals": list(dict.fromkeys([*options.return_signals, *returned]))}
    if len(options.composed) > 1:  # the group policy (the primary) with the group's parameters, the others as asked
        # only what was set: a default written out would count as set, against the other policies' settings
        others = [{"policy": name, "params": p.model_dump(exclude_unset=True)} for name, p in options.composed[1:]]
        entropy["policies"] = [{"policy": options.policy, "params": trace_params}, *others]
    else:
        entropy.update(policy=options.policy, params=trace_params)
    sub = copy.copy(obj)
    sub.rid = rid
    custom = dict(obj.sampling_params.get("custom_params") or {})
    custom[REQUEST_KEY] = entropy
    sub.sampling_params = {**obj.sampling_params, "n": 1, "custom_params": custom}
    return sub, trace_params


def _trace_finished(output: dict, sequence: SequenceOutputs, role: str, group: Group, options, manager, metrics):
    meta = output["meta_info"]
    finish = meta.get("finish_reason") or {}
    summary = TraceSummary(
        rid=meta["id"],
        text=sequence.text,
        output_tokens=meta.get("completion_tokens", 0),
        signals=sequence.signals,
        stopped_early=bool(finish.get("entropy_policy")),
        finish_reason=finish,
        warmup=role == "warmup",
    )
    group.view.finished.append(summary)
    finished = getattr(installed_policies().policy(options.policy), "group_trace_finished", None)
    update = finished(group.view, summary) if finished else None
    if update is not None:
        _apply(update, group, options, manager, metrics)


def _apply(update, group: Group, options: ResolvedRequest, tokenizer_manager, metrics) -> None:
    if update.params:
        overrides = {**group.view.overrides, **update.params}
        # validated like a request's own parameters: a bad value fails the group, loudly
        spec = installed_policies().get(options.policy).spec
        spec.params.model_validate({**options.params.model_dump(exclude_none=True), **overrides})
        group.view.overrides = overrides
        if update.params.get("threshold") is not None:  # a threshold set from the group's traces
            metrics.calibration(options.policy, update.params["threshold"])
    if update.stop_group and not group.stopped:
        group.stopped = True
        metrics.consensus_stop(options.policy)
        logger.info("group %s stopped; aborting its %d running traces", group.view.group_id, len(group.running))
        for rid in list(group.running):
            tokenizer_manager.abort_request(rid)


def _not_started(rid: str, group: Group, options: ResolvedRequest) -> dict:
    return {
        "text": "",
        "output_ids": [],
        "meta_info": {
            "id": rid,
            "finish_reason": {"type": "abort", "message": NOT_STARTED},
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "entropy": {
                "policy": options.label,
                "signals": {name: [] for name in options.return_signals},
                "events": [],
                "group": {"id": group.view.group_id, "role": None, "threshold": None},
            },
        },
    }


def sampling_params_list(sampling_params) -> list[dict]:
    if isinstance(sampling_params, list):
        return [p if isinstance(p, dict) else {} for p in sampling_params]
    return [sampling_params if isinstance(sampling_params, dict) else {}]


def single_prompt(obj) -> bool:
    if getattr(obj, "text", None) is not None:
        return isinstance(obj.text, str)
    input_ids = getattr(obj, "input_ids", None)
    return isinstance(input_ids, list) and (not input_ids or isinstance(input_ids[0], int))
