"""Routing speculative drafts: the adapter side of ``route_drafts``.

The portable platform's multi-drafter worker (``sglang_entropy.platform.spec_worker``) drafts
with every drafter and hands the proposals here. This module resolves each request's routing
policy and parameters (once per request), calls the policy's hook on device tensors, and after
verification records one ``route`` event per request and step, at the output index of the
step's first new token, when SGLang processes the step's results.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from sglang.srt.plugins.hook_registry import HookType

from sglang_entropy.adapter.metrics import NoMetrics
from sglang_entropy.adapter.protocol import EVENTS_KEY, put_token_value
from sglang_entropy.adapter.scheduler.state import STATE
from sglang_entropy.registry import PolicyRegistry, installed_policies
from sglang_entropy.settings import ServerSettings
from sglang_entropy.types import DraftProposals, RouteDecision, encode_params

logger = logging.getLogger(__name__)


@dataclass
class RouteState:
    policy: str
    params: dict[str, float | int]  # numeric encoding of the parameters (see encode_params)
    previous: int = -1  # drafter chosen at the previous step


class Router:
    """Routes every row of a speculative step to a drafter by its request's routing policy.

    ``options(req)`` gives a request's resolved options (the scheduler state's, resolved once
    per request); each request's routing state is kept by rid until ``forget``."""

    def __init__(self, drafter_names: tuple[str, ...], registry: PolicyRegistry | None = None, options=None):
        self.registry = registry or installed_policies()
        self.settings = ServerSettings.from_env()
        self.drafter_names = drafter_names
        self.default_policy = self.settings.default_routing_policy(self.registry)
        self.options = options or (lambda req: self.settings.resolve(req.sampling_params.custom_params, self.registry))
        self.states: dict[str, RouteState] = {}  # rid -> its routing state
        self.metrics = NoMetrics()  # the scheduler's Metrics with --enable-metrics

    def forget(self, rid: str) -> None:
        self.states.pop(rid, None)

    def _state(self, req) -> RouteState:
        state = self.states.get(req.rid)
        if state is not None:
            return state
        resolved = self.options(req)
        policy = resolved.policy if resolved is not None else None
        if policy is None or self.registry.get(policy).spec.family != "speculative":
            # The frontend validated the request; a decode policy does not route drafts.
            policy = self.default_policy
            params = self.registry.get(policy).spec.params()
        else:
            params = resolved.params
        state = self.states[req.rid] = RouteState(policy, encode_params(params))
        req.customized_info = req.customized_info or {}
        req.customized_info.setdefault(EVENTS_KEY, [])
        return state

    def route(self, reqs, tokens: torch.Tensor, logprobs: torch.Tensor) -> RouteDecision:
        """Choose a drafter per row of ``reqs``; ``tokens``/``logprobs`` are [D, B, N]."""
        states = [self._state(req) for req in reqs]
        device = tokens.device
        chosen = torch.zeros(len(reqs), dtype=torch.int64, device=device)
        confidence = torch.full(logprobs.shape[:2], math.nan, device=device)
        for policy in dict.fromkeys(s.policy for s in states):
            rows = [i for i, s in enumerate(states) if s.policy == policy]
            index = torch.tensor(rows, dtype=torch.int64, device=device)
            names = sorted({k for i in rows for k in states[i].params})
            proposals = DraftProposals(
                tokens=tokens[:, index],
                logprobs=logprobs[:, index],
                drafter_names=self.drafter_names,
                params={k: torch.tensor([states[i].params[k] for i in rows], device=device) for k in names},
                previous=torch.tensor([states[i].previous for i in rows], dtype=torch.int64, device=device),
            )
            decision = self.registry.policy(policy).route_drafts(proposals)
            if not isinstance(decision, RouteDecision):
                raise TypeError(
                    f"policy {policy!r}: route_drafts returned {type(decision).__name__}, not RouteDecision"
                )
            chosen[index] = decision.drafter.long()
            if decision.confidence is not None:
                confidence[:, index] = decision.confidence.float()
        return RouteDecision(drafter=chosen, confidence=confidence)

    def record(self, reqs, decision: RouteDecision, accept_lens: torch.Tensor) -> None:
        """After verification (host): one route event per request, on the step's first new token.
        ``accept_lens``: tokens the step commits per row, the target's bonus token included."""
        drafters = decision.drafter.tolist()
        confidences = decision.confidence.T.tolist()
        for req, drafter, conf, accepted in zip(reqs, drafters, confidences, accept_lens.tolist(), strict=True):
            state = self.states.get(req.rid)
            if state is None:  # routing failed before this request was resolved (it is aborted)
                continue
            state.previous = drafter
            event = {
                "kind": "route",
                "policy": state.policy,
                "drafter": drafter,
                "drafter_name": self.drafter_names[drafter],
                "confidences": [None if math.isnan(c) else c for c in conf],
                "accepted": accepted,
            }
            put_token_value(req.customized_info[EVENTS_KEY], len(req.output_ids), [event])
            self.metrics.route(self.drafter_names[drafter], accepted)


def record_routes(processor, batch, result):
    """BEFORE SGLang's ``process_batch_result_decode``: the step's route events. The drafter
    group left its decision with the scheduler state, keyed by the step's result; SGLang waits
    for the result's host copy first thing in that function, so waiting here first costs
    nothing more."""
    route = STATE.route_decisions.pop(id(result), None)
    if route is None:
        return
    if result.copy_done is not None:
        result.copy_done.synchronize()
    router, decision = route
    router.record(batch.reqs, decision, result.accept_lens)


HOOKS = (
    (
        "sglang.srt.managers.scheduler_components.batch_result_processor."
        "SchedulerBatchResultProcessor.process_batch_result_decode",
        record_routes,
        HookType.BEFORE,
    ),
)
