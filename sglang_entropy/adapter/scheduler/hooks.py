"""Hooks in the scheduler process: resolve each request once, install the observer, track
request slots, apply stops and forks. All state is ``state.STATE``'s."""

from __future__ import annotations

import torch
from sglang.srt.plugins.hook_registry import HookType

from sglang_entropy.adapter.protocol import EntropyStop, invalid_request
from sglang_entropy.adapter.scheduler import runtime
from sglang_entropy.adapter.scheduler.state import STATE
from sglang_entropy.registry import installed_policies


def admit_request(scheduler, recv_req, *args, **kwargs):
    """BEFORE ``Scheduler.handle_generate_request``."""
    STATE.admit(scheduler, recv_req)


def install_observer(result, model_runner, *args, **kwargs):
    if model_runner.is_draft_worker or not model_runner.supports_sampling_observer():
        return
    num_slots = model_runner.req_to_token_pool.req_to_token.shape[0]
    device = torch.device(model_runner.device)
    STATE.runtime = runtime.EntropyRuntime(num_slots, device, STATE.settings, installed_policies())
    STATE.runtime.metrics = STATE.metrics
    STATE.observer = runtime.EntropyObserver(STATE.runtime)
    model_runner.sampling_observer = STATE.observer


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
    """AFTER ``ReqToTokenPool.alloc``: the requests have slots. Invalid options end the request."""
    if result is None:
        return
    for req in reqs:
        try:
            options = STATE.options(req)
        except ValueError as e:
            req.to_finish = invalid_request(e)
            continue
        if STATE.runtime is not None:
            STATE.runtime.start(req, options, STATE.branches.inherited.get(req.rid))


def end_request(pool, req, *args, **kwargs):
    """BEFORE ``ReqToTokenPool.free``: the request leaves its slot (for good when finished)."""
    if STATE.runtime is not None:
        STATE.runtime.end(req)
    if req.finished():
        STATE.forget(req.rid, pruned=isinstance(req.finished_reason, EntropyStop))


def forget_unqueued(scheduler, abort_req, req, *args, **kwargs):
    """BEFORE ``Scheduler.send_abort_output``: SGLang ends a request outside the output stream
    (aborted while queued, rejected); it may never reach a slot."""
    STATE.forget(req.rid)


def apply_stops(processor, batch, result, *args, **kwargs):
    observer = STATE.observer
    if observer is not None and observer.failure is not None:
        runtime.abort_after_step_failure(observer, batch)
    host = runtime.find_host_output(result)
    if host is None:
        return
    if result.copy_done is not None:  # SGLang waits for this copy first thing in the same call
        result.copy_done.synchronize()
    host.stops(batch)
    STATE.branches.fork_rows(batch, host, host.runtime)


def report_state(result, controller, *args, **kwargs):
    """``/get_server_info`` shows the adapter's live state under ``internal_states[i]["entropy"]``."""
    if result is not None:
        result.internal_state["entropy"] = STATE.report()
    return result


_PROCESSOR = "sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
HOOKS = (
    ("sglang.srt.managers.scheduler.Scheduler.handle_generate_request", admit_request, HookType.BEFORE),
    ("sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool", install_observer, HookType.AFTER),
    ("sglang.srt.model_executor.model_runner.ModelRunner.sample", sample_with_batch, HookType.AROUND),
    ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.alloc", start_requests, HookType.AFTER),
    ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free", end_request, HookType.BEFORE),
    ("sglang.srt.managers.scheduler.Scheduler.send_abort_output", forget_unqueued, HookType.BEFORE),
    (f"{_PROCESSOR}.process_batch_result_decode", apply_stops, HookType.BEFORE),
    (f"{_PROCESSOR}.process_batch_result_prefill", apply_stops, HookType.BEFORE),
    (
        "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
        report_state,
        HookType.AFTER,
    ),
)
