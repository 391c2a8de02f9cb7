"""Hooks in the scheduler process: install the observer, track request slots, apply stops."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType

from sglang_entropy.adapter.scheduler import branching, runtime

_OBSERVER: runtime.EntropyObserver | None = None


def install_observer(result, model_runner, *args, **kwargs):
    if model_runner.is_draft_worker or not model_runner.supports_sampling_observer():
        return
    pool = model_runner.req_to_token_pool
    global _OBSERVER
    state = runtime.create_runtime(num_slots=pool.req_to_token.shape[0], device=model_runner.device)
    _OBSERVER = runtime.EntropyObserver(state)
    model_runner.sampling_observer = _OBSERVER


def sample_with_batch(original, model_runner, logits_output, forward_batch, *args, **kwargs):
    """Let the observer see which request slots and lengths the rows of this call belong to."""
    observer = model_runner.sampling_observer
    if not isinstance(observer, runtime.EntropyObserver):
        return original(model_runner, logits_output, forward_batch, *args, **kwargs)
    observer.forward_batch = forward_batch
    try:
        return original(model_runner, logits_output, forward_batch, *args, **kwargs)
    finally:
        observer.forward_batch = None


def start_requests(result, pool, reqs, *args, **kwargs):
    if result is not None and runtime._RUNTIME is not None:
        for req in reqs:
            runtime._RUNTIME.start(req)


def end_request(pool, req, *args, **kwargs):
    if runtime._RUNTIME is not None:
        runtime._RUNTIME.end(req)
    if req.finished():
        branching.forget_request(req.rid)


def apply_stops(processor, batch, result, *args, **kwargs):
    observer = _OBSERVER
    if observer is not None and observer.failure is not None:
        runtime.abort_after_step_failure(observer, batch)
    host = runtime.find_host_output(result)
    if host is None:
        return
    if result.copy_done is not None:  # SGLang waits for this copy first thing in the same call
        result.copy_done.synchronize()
    host.stops(batch)
    branching.fork_rows(batch, host, runtime.current_runtime())


def report_state(result, controller, *args, **kwargs):
    """``/get_server_info`` shows the adapter's live state under ``internal_states[i]["entropy"]``."""
    if runtime._RUNTIME is not None and result is not None:
        result.internal_state["entropy"] = {**runtime._RUNTIME.report(), **branching.report()}
    return result


_PROCESSOR = "sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
HOOKS = (
    ("sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool", install_observer, HookType.AFTER),
    ("sglang.srt.model_executor.model_runner.ModelRunner.sample", sample_with_batch, HookType.AROUND),
    ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.alloc", start_requests, HookType.AFTER),
    ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free", end_request, HookType.BEFORE),
    ("sglang.srt.managers.scheduler.Scheduler.send_abort_output", branching.forget_unqueued, HookType.BEFORE),
    (f"{_PROCESSOR}.process_batch_result_decode", apply_stops, HookType.BEFORE),
    (f"{_PROCESSOR}.process_batch_result_prefill", apply_stops, HookType.BEFORE),
    (
        "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
        report_state,
        HookType.AFTER,
    ),
)
