"""The adapter's Prometheus metrics, on SGLang's own ``/metrics`` (``--enable-metrics``).

Each process counts what happens in it (the HTTP server process: requests, sequences per
branching request, group calibrations and consensus stops; the scheduler: stops, tokens,
forks, routes, dLLM forwards, failures) with ``prometheus_client`` in SGLang's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, which SGLang sets), so ``/metrics`` sums them. Names and
labels follow SGLang's (``sglang:``, ``model_name``). Without ``--enable-metrics`` every call
is a no-op.
"""

from __future__ import annotations

import functools


class ProcessState:
    """What both of the adapter's state owners (``STATE``, ``FRONTEND``) read lazily: the
    server's settings (the launch flags set the environment first) and this process's metrics."""

    @functools.cached_property
    def settings(self):
        from sglang_entropy.settings import ServerSettings

        return ServerSettings.from_env()

    @functools.cached_property
    def metrics(self):
        return metrics_for_this_process()


@functools.cache
def metrics_for_this_process():
    """``Metrics`` when the server runs with ``--enable-metrics``, else ``NoMetrics`` (one per
    process: Prometheus metrics register once)."""
    from sglang.srt.runtime_context import get_observability, get_serving

    try:
        enabled, model = get_observability().enable_metrics, get_serving().served_model_name
    except Exception:  # no SGLang server in this process (unit tests, tools)
        return NoMetrics()
    return Metrics({"model_name": model or "default"}) if enabled else NoMetrics()


class NoMetrics:
    """Metrics off: every event is ignored."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class Metrics:
    def __init__(self, labels: dict[str, str]):
        from prometheus_client import Counter, Histogram

        self.labels = labels
        names = list(labels)

        def counter(name, doc, *extra):
            return Counter(f"sglang:entropy_{name}", doc, [*names, *extra])

        def histogram(name, doc, buckets, *extra):
            return Histogram(f"sglang:entropy_{name}", doc, [*names, *extra], buckets=buckets)

        self._requests = counter("requests_total", "Requests that selected a policy", "policy")
        self._stops = counter("stops_total", "Sequences a policy stopped", "policy", "reason")
        self._tokens = counter("generated_tokens_total", "Tokens generated under each policy", "policy")
        self._saved = counter(
            "saved_tokens_total", "Tokens not generated because a policy stopped (max_new_tokens left)", "policy"
        )
        self._forks = counter("forks_total", "Sequences forked by branching policies, applied or refused", "outcome")
        self._returned = counter(
            "budget_returned_total", "Sequences pruned by a policy that gave their share back to a budget group"
        )
        self._sequences = histogram(
            "sequences_per_request", "Sequences of a branching request", (1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self._calibrations = counter("group_calibrations_total", "Group thresholds set from warm-up traces", "policy")
        self._thresholds = histogram(
            "calibrated_threshold", "Thresholds the group calibrations set", (1, 2, 4, 6, 8, 10, 12, 16, 24), "policy"
        )
        self._consensus = counter("consensus_stops_total", "Groups stopped at consensus", "policy")
        self._routes = counter("routes_total", "Speculative steps routed to each drafter", "drafter")
        self._accepted = histogram(
            "accepted_tokens_per_step", "Tokens committed per verified speculative step", (1, 2, 3, 4, 5, 6, 8, 12, 16)
        )
        self._dllm_forwards = histogram(
            "dllm_forwards_per_block", "Model forwards per generated diffusion block", (1, 2, 3, 4, 6, 8, 12, 16, 32)
        )
        self._failures = counter("policy_failures_total", "Requests ended because a policy failed", "policy")

    def _with(self, metric, **labels):
        return metric.labels(**self.labels, **labels)

    def request(self, policy: str) -> None:
        self._with(self._requests, policy=policy).inc()

    def stop(self, policy: str, reason: str, tokens_left: int) -> None:
        self._with(self._stops, policy=policy, reason=reason).inc()
        self._with(self._saved, policy=policy).inc(max(0, tokens_left))

    def tokens(self, policy: str, count: int = 1) -> None:
        self._with(self._tokens, policy=policy).inc(count)

    def forks(self, applied: int, refused: int) -> None:
        if applied:
            self._with(self._forks, outcome="applied").inc(applied)
        if refused:
            self._with(self._forks, outcome="refused").inc(refused)

    def budget_returned(self) -> None:
        self._with(self._returned).inc()

    def sequences(self, count: int) -> None:
        self._with(self._sequences).observe(count)

    def calibration(self, policy: str, threshold: float) -> None:
        self._with(self._calibrations, policy=policy).inc()
        self._with(self._thresholds, policy=policy).observe(threshold)

    def consensus_stop(self, policy: str) -> None:
        self._with(self._consensus, policy=policy).inc()

    def route(self, drafter: str, accepted: int) -> None:
        self._with(self._routes, drafter=drafter).inc()
        self._with(self._accepted).observe(accepted)

    def dllm_block(self, forwards: int) -> None:
        self._with(self._dllm_forwards).observe(forwards)

    def failure(self, policy: str) -> None:
        self._with(self._failures, policy=policy).inc()
