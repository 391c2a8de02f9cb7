"""The one owner of the adapter's state in a scheduler process (``STATE``)."""

from __future__ import annotations

import functools
import logging

from sglang_entropy.adapter.metrics import ProcessState
from sglang_entropy.adapter.scheduler.branching import BranchBook
from sglang_entropy.registry import installed_policies
from sglang_entropy.settings import ResolvedRequest

logger = logging.getLogger(__name__)


class SchedulerState(ProcessState):
    """Everything the adapter holds in one scheduler process: each request's options (resolved
    once, by rid, when the request reaches the scheduler), the runtime with its slot buffers and
    observer, branch bookkeeping, the last dLLM run and the speculative router."""

    def __init__(self):
        self.requests: dict[str, ResolvedRequest | None | ValueError] = {}  # rid -> its options, or why invalid
        self.runtime = None  # EntropyRuntime, made with the model runner's memory pool
        self.observer = None  # EntropyObserver
        self.dllm_run = None  # RunRecord of the last dLLM forward call, for its result processing
        self.block_nfe: dict[str, int] = {}  # rid -> forwards of its block so far (dLLM)
        self.prompt_nfe: dict[str, int] = {}  # rid -> forwards of prompt-only blocks not reported yet
        self.dllm_params: dict[str, object] = {}  # rid -> the dLLM parameters its rows run with
        self.router = None  # speculative Router, with --entropy-drafters
        self.route_decisions: dict[int, tuple] = {}  # id(step result) -> (router, RouteDecision)

    @functools.cached_property
    def branches(self) -> BranchBook:
        return BranchBook(max_idle_pools=self.settings.config.limits.max_groups, metrics=self.metrics)

    def admit(self, scheduler, recv_req) -> None:
        """A request reached the scheduler: resolve its options once."""
        try:
            resolved = self.settings.resolve(recv_req.sampling_params.custom_params, installed_policies())
        except ValueError as e:  # the tokenizer manager validated it; this guards direct scheduler use
            logger.warning("request %s: invalid entropy options: %s", recv_req.rid, e)
            self.requests[recv_req.rid] = e
            return
        self.requests[recv_req.rid] = resolved
        if resolved is not None and resolved.policy is not None:
            self.branches.remember(scheduler, recv_req, resolved.params)

    def options(self, req) -> ResolvedRequest | None:
        """A request's options (raises ValueError when they are invalid). Requests that never
        went through the scheduler's intake (none, in SGLang 0.5.23) are resolved here."""
        if req.rid not in self.requests:
            self.requests[req.rid] = self.settings.resolve(req.sampling_params.custom_params, installed_policies())
        options = self.requests[req.rid]
        if isinstance(options, ValueError):
            raise options
        return options

    def forget(self, rid: str, pruned: bool = False) -> None:
        """A request ended for good (finished, aborted, rejected; ``pruned``: a policy stopped
        it early): drop all it left here."""
        self.requests.pop(rid, None)
        self.block_nfe.pop(rid, None)
        self.prompt_nfe.pop(rid, None)
        self.dllm_params.pop(rid, None)
        if self.router is not None:
            self.router.forget(rid)
        self.branches.forget(rid, pruned)

    def report(self) -> dict:
        """The adapter's live state for ``/get_server_info``."""
        report = self.runtime.report() if self.runtime is not None else {}
        return {**report, **self.branches.report(), "tracked_requests": len(self.requests)}


STATE = SchedulerState()
