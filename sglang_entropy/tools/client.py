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
        return super().generate(s, _with_entropy(sampling_params, s.arguments.get("entropy")))

    def generate_stream(self, s, sampling_params):
        return super().generate_stream(s, _with_entropy(sampling_params, s.arguments.get("entropy")))
