"""Client side: SGLang frontend programs that pick a policy.

``sgl.gen`` has no field for ``custom_params``, so ``EntropyEndpoint`` (a ``RuntimeEndpoint``)
takes them from the program's ``entropy`` argument: every ``gen`` of a program run with
``entropy={"policy": ..., "params": ..., "return_signals": [...]}`` carries it, forks
included, and ``state.get_meta_info(name)["entropy"]`` holds what came back.
"""

from __future__ import annotations

import copy

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.ir import SglSamplingParams

from sglang_entropy.tools.server import ROUTING_KEY_HEADER


class _WithEntropy(SglSamplingParams):
    entropy: dict | None = None

    def to_srt_kwargs(self):
        kwargs = super().to_srt_kwargs()
        if self.entropy is not None:
            kwargs["custom_params"] = {"entropy": self.entropy}
        return kwargs


def _with_entropy(sampling_params: SglSamplingParams, entropy: dict | None) -> SglSamplingParams:
    params = copy.copy(sampling_params)
    params.__class__ = _WithEntropy
    params.entropy = entropy
    return params


class EntropyEndpoint(RuntimeEndpoint):
    """A frontend backend whose generate calls carry the program's ``entropy`` argument."""

    def generate(self, s, sampling_params):
        entropy = s.arguments.get("entropy")
        text, meta_info = super().generate(s, _with_entropy(sampling_params, entropy))
        if entropy and "entropy" not in meta_info:
            raise RuntimeError(
                f"{self.base_url} answered without applying the program's entropy options: it is not a server "
                "with the adapter enabled (sglang-router's /generate drops custom_params: point frontend programs "
                "at a server, not a router)"
            )
        return text, meta_info

    def generate_stream(self, s, sampling_params):
        return super().generate_stream(s, _with_entropy(sampling_params, s.arguments.get("entropy")))


def routing_headers(entropy: dict) -> dict[str, str]:
    """HTTP headers that send the requests of one group to one server behind sglang-router
    (launched with ``--policy manual``): the group's ``group_id`` or ``budget_group`` as the
    routing key. Empty for a request that names no group. Send requests through the router's
    ``/v1/completions``: sglang-router 0.3.2 forwards ``/generate`` and ``/v1/chat/completions``
    without ``custom_params``."""
    params = entropy.get("params") or {}
    name = params.get("group_id") or params.get("budget_group")
    return {ROUTING_KEY_HEADER: str(name)} if name else {}
