"""Carry out policies' branch decisions inside the scheduler (policies registered with
``branches=True``); the tokenizer side is ``adapter.frontend.branches``.

When a policy's decision gives a row ``branch_width`` > 0 (and the request's family holds
fewer than ``max_sequences`` sequences), the parent's KV up to the branch token is
checkpointed into the radix tree and a child request ``<root rid>-b<k>`` is queued whose input
is the parent's prompt plus its output before the branch token; its prefill matches the
parent's prefix in the tree. The child inherits the parent's per-slot state as it was at the
fork (``EntropyRuntime.fork_state``): its group-confidence window continues over the shared
prefix, so a composed pruning policy judges the child by its whole trace. A sequence that a
policy stops early (pruned) gives its sequence back to its budget group's pool.
"""

from __future__ import annotations

import copy
import logging
from array import array
from collections import Counter, OrderedDict

from sglang_entropy.adapter.metrics import NoMetrics
from sglang_entropy.adapter.protocol import policy_failure
from sglang_entropy.types import BranchParams

logger = logging.getLogger(__name__)


class BranchBook:
    """The scheduler's bookkeeping of branching requests: their sequences and budget pools."""

    def __init__(self, max_idle_pools: int, metrics=None):
        self.max_idle_pools = max_idle_pools  # [limits] max_groups
        self.metrics = metrics or NoMetrics()
        self.scheduler = None  # SGLang's scheduler: forks queue children through it
        self.tokenized: dict = {}  # rid -> TokenizedGenerateReqInput of requests with a policy
        self.root: dict[str, str] = {}  # rid -> rid of the client request it belongs to
        self.size: dict[str, int] = {}  # root rid -> sequences so far
        self.live: dict[str, int] = {}  # root rid -> sequences not finished yet
        self.pools: OrderedDict[str, int] = OrderedDict()  # budget group -> sequences left, least recent first
        self.pool_users: Counter[str] = Counter()  # budget group -> requests with sequences still running
        self.pool_of: dict[str, str] = {}  # root rid -> its budget group
        self.inherited: dict = {}  # child rid -> Inheritance, until the child ends

    def remember(self, scheduler, recv_req, params) -> None:
        """A request with a policy reached the scheduler (``params``: its validated parameters)."""
        self.scheduler = scheduler
        self.tokenized[recv_req.rid] = recv_req
        root = self.root.setdefault(recv_req.rid, recv_req.rid)
        if root == recv_req.rid and root not in self.size:
            self.size[root] = self.live[root] = 1
            if isinstance(params, BranchParams) and params.budget_group is not None:  # client-scoped
                self._join_pool(root, params.budget_group, params.budget)

    def _join_pool(self, root: str, group: str, budget: int) -> None:
        """The request's first sequence takes one of its budget group's sequences. Pools nobody
        uses are forgotten beyond ``max_idle_pools``, least recently used first (the tokenizer
        manager admits at most that many groups in use)."""
        self.pools[group] = self.pools.get(group, budget) - 1
        self.pools.move_to_end(group)
        self.pool_users[group] += 1
        self.pool_of[root] = group
        idle = [name for name in self.pools if not self.pool_users[name]]
        for name in idle[: max(0, len(self.pools) - self.max_idle_pools)]:
            del self.pools[name], self.pool_users[name]

    def forget(self, rid: str, pruned: bool = False) -> None:
        """A sequence ended (``pruned``: a policy stopped it early); its request's counters go
        once every sequence has (idempotent). A pruned sequence returns its share of the budget."""
        self.tokenized.pop(rid, None)
        self.inherited.pop(rid, None)
        root = self.root.pop(rid, None)
        group = self.pool_of.get(root)
        if pruned and group in self.pools:
            self.pools[group] += 1
            self.metrics.budget_returned()
        if root in self.live:
            self.live[root] -= 1
            if self.live[root] == 0:
                del self.live[root], self.size[root]
                group = self.pool_of.pop(root, None)
                if group is not None:
                    self.pool_users[group] -= 1

    def report(self) -> dict:
        """For ``/get_server_info`` (all zero once every request has ended)."""
        return {
            "branching_requests": len(self.size),
            "tracked_sequences": len(self.root),
            "inherited_states": len(self.inherited),
            "budget_pools_in_use": sum(1 for users in self.pool_users.values() if users),
        }

    def fork_rows(self, batch, host, runtime) -> None:
        """Before SGLang commits this step's tokens: fork the rows whose policy asked for it. A
        fork that fails ends its own request (abort naming the error), not the scheduler."""
        for req, row in zip(batch.reqs, host.rows(), strict=True):
            if row["branch_width"] <= 0 or not row["valid"] or req.finished() or req.to_finish is not None:
                continue
            try:
                self._fork_row(req, row, runtime)
            except Exception as e:
                logger.exception("fork of %s failed", req.rid)
                req.to_finish = policy_failure("branching", e)
                self.metrics.failure("branching")

    def _fork_row(self, req, row, runtime) -> None:
        record, root = runtime.records.get(req.rid), self.root.get(req.rid)
        if record is None or req.rid not in self.tokenized or root not in self.size:
            return
        params = record.resolved.params
        if not isinstance(params, BranchParams):  # only policies registered with branches=True fork
            return
        width = min(int(row["branch_width"]), params.max_sequences - self.size[root])
        if params.budget_group is not None:
            width = min(width, self.pools.get(params.budget_group, 0))
        index = int(row["token_index"])  # the token sampled now; the children replace it
        if index == 0 and req.rid != root:
            return  # a child's first token is itself the alternative at its parent's branch point
        if width <= 0:  # the request's sequences or its budget group's are spent
            self.metrics.forks(applied=0, refused=int(row["branch_width"]))
            return
        shared = len(req.origin_input_ids) + index
        req.refresh_fill_ids()
        self.scheduler.tree_cache.checkpoint(req, up_to=shared)
        children = []
        try:
            inheritance = runtime.fork_state(record, index)
            for _ in range(width):
                children.append(self._queue_child(req, root, index, inheritance))
        finally:  # the children queued so far are the request's, whatever happened to the others
            if params.budget_group is not None:
                self.pools[params.budget_group] -= len(children)
            runtime.children[(req.rid, index)] = children
            self.metrics.forks(applied=len(children), refused=int(row["branch_width"]) - len(children))
        logger.debug("fork %s at token %d into %s (%d shared tokens)", req.rid, index, children, shared)

    def _queue_child(self, req, root: str, index: int, inheritance) -> str:
        recv = self.tokenized[req.rid]
        child = copy.copy(recv)
        child.rid = f"{root}-b{self.size[root]}"
        self.size[root] += 1
        child.input_ids = array("q", list(req.origin_input_ids) + list(req.output_ids[:index]))
        child.input_text = None
        child.sampling_params = copy.copy(recv.sampling_params)
        child.sampling_params.max_new_tokens = recv.sampling_params.max_new_tokens - index
        self.root[child.rid] = root  # before SGLang sees it: it may end the child at once
        self.inherited[child.rid] = inheritance
        self.live[root] += 1
        try:
            self.scheduler.handle_generate_request(child)
        except Exception:
            self.forget(child.rid)
            raise
        return child.rid
