"""Carry out policies' branch decisions inside the scheduler (policies registered with
``branches=True``); the tokenizer side is ``adapter.frontend.branches``.

When a policy's decision gives a row ``branch_width`` > 0 (and the request's
family holds fewer than ``max_sequences`` sequences), the parent's KV up to the branch token is
checkpointed into the radix tree and a child request ``<root rid>-b<k>`` is queued whose input
is the parent's prompt plus its output before the branch token; its prefill matches the
parent's prefix in the tree.
"""

from __future__ import annotations

import copy
import functools
import logging
from array import array
from collections import Counter, OrderedDict

from sglang.srt.plugins.hook_registry import HookType

from sglang_entropy.adapter.protocol import policy_failure
from sglang_entropy.settings import ServerSettings
from sglang_entropy.types import BranchParams

logger = logging.getLogger(__name__)

_SCHEDULER = None
_TOKENIZED: dict = {}  # rid -> TokenizedGenerateReqInput of requests with a policy
_ROOT: dict[str, str] = {}  # rid -> rid of the client request it belongs to
_SIZE: dict[str, int] = {}  # root rid -> sequences so far
_LIVE: dict[str, int] = {}  # root rid -> sequences not finished yet
_POOLS: OrderedDict[str, int] = OrderedDict()  # budget group -> sequences left, least recently used first
_POOL_USERS: Counter[str] = Counter()  # budget group -> requests with sequences still running
_POOL_OF: dict[str, str] = {}  # root rid -> its budget group


@functools.cache
def _max_idle_pools() -> int:
    return ServerSettings.from_env().config.limits.max_groups


def remember_request(scheduler, recv_req, *args, **kwargs):
    global _SCHEDULER
    _SCHEDULER = scheduler
    custom = getattr(recv_req.sampling_params, "custom_params", None) or {}
    if isinstance(custom.get("entropy"), dict) and custom["entropy"].get("policy"):
        _TOKENIZED[recv_req.rid] = recv_req
        root = _ROOT.setdefault(recv_req.rid, recv_req.rid)
        if root == recv_req.rid and root not in _SIZE:
            _SIZE[root] = _LIVE[root] = 1
            params = custom["entropy"].get("params") or {}
            if params.get("budget_group") is not None:  # validated and client-scoped by the tokenizer manager
                _join_pool(root, params["budget_group"], params["budget"])


def _join_pool(root: str, group: str, budget: int) -> None:
    """The request's first sequence takes one of its budget group's sequences. Pools nobody
    uses are forgotten beyond ``[limits] max_groups``, least recently used first (the tokenizer
    manager admits at most that many groups in use)."""
    _POOLS[group] = _POOLS.get(group, budget) - 1
    _POOLS.move_to_end(group)
    _POOL_USERS[group] += 1
    _POOL_OF[root] = group
    idle = [name for name in _POOLS if not _POOL_USERS[name]]
    for name in idle[: max(0, len(_POOLS) - _max_idle_pools())]:
        del _POOLS[name], _POOL_USERS[name]


def forget_request(rid: str) -> None:
    """A sequence finished; its request's counters go once every sequence has."""
    _TOKENIZED.pop(rid, None)
    root = _ROOT.pop(rid, None)
    if root in _LIVE:
        _LIVE[root] -= 1
        if _LIVE[root] == 0:
            del _LIVE[root], _SIZE[root]
            group = _POOL_OF.pop(root, None)
            if group is not None:
                _POOL_USERS[group] -= 1


def forget_unqueued(scheduler, abort_req, req, *args, **kwargs):
    """SGLang ends a request outside the output stream (aborted while queued, rejected): it
    never reaches a slot, so its bookkeeping goes here."""
    forget_request(req.rid)


def report() -> dict:
    """Branch bookkeeping for ``/get_server_info`` (all zero once every request has ended)."""
    return {
        "branching_requests": len(_SIZE),
        "tracked_sequences": len(_ROOT),
        "budget_pools_in_use": sum(1 for users in _POOL_USERS.values() if users),
    }


def fork_rows(batch, host, runtime) -> None:
    """Before SGLang commits this step's tokens: fork the rows whose policy asked for it. A
    fork that fails ends its own request (abort naming the error), not the scheduler."""
    for req, row in zip(batch.reqs, host.rows(), strict=True):
        if row["branch_width"] <= 0 or not row["valid"] or req.finished() or req.to_finish is not None:
            continue
        try:
            _fork_row(req, row, runtime)
        except Exception as e:
            logger.exception("fork of %s failed", req.rid)
            req.to_finish = policy_failure("branching", e)


def _fork_row(req, row, runtime) -> None:
    record, recv = runtime.records.get(req.rid), _TOKENIZED.get(req.rid)
    root = _ROOT.get(req.rid)
    if record is None or recv is None or root not in _SIZE:
        return
    params = record.resolved.params
    if not isinstance(params, BranchParams):  # only policies registered with branches=True fork
        return
    width = min(int(row["branch_width"]), params.max_sequences - _SIZE[root])
    group = params.budget_group
    if group is not None:
        width = min(width, _POOLS.get(group, 0))
    if width <= 0:
        return
    index = int(row["token_index"])  # the token sampled now; the children replace it
    if index == 0 and req.rid != root:
        return  # a child's first token is itself the alternative at its parent's branch point
    shared = len(req.origin_input_ids) + index
    req.refresh_fill_ids()
    _SCHEDULER.tree_cache.checkpoint(req, up_to=shared)
    children = []
    try:
        for _ in range(width):
            child = copy.copy(recv)
            child.rid = f"{root}-b{_SIZE[root]}"
            _SIZE[root] += 1
            child.input_ids = array("q", list(req.origin_input_ids) + list(req.output_ids[:index]))
            child.input_text = None
            child.sampling_params = copy.copy(recv.sampling_params)
            child.sampling_params.max_new_tokens = recv.sampling_params.max_new_tokens - index
            _ROOT[child.rid] = root  # before SGLang sees it: it may end the child at once
            _LIVE[root] += 1
            try:
                _SCHEDULER.handle_generate_request(child)
            except Exception:
                forget_request(child.rid)
                raise
            children.append(child.rid)
    finally:  # the children queued so far are the request's, whatever happened to the others
        if group is not None:
            _POOLS[group] -= len(children)
        runtime.children[(req.rid, index)] = children
    logger.debug("fork %s at token %d into %s (%d shared tokens)", req.rid, index, children, shared)


HOOKS = (("sglang.srt.managers.scheduler.Scheduler.handle_generate_request", remember_request, HookType.BEFORE),)
