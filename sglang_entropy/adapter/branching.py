"""PROTOTYPE (branch eager-wip): fork a decoding request inside the scheduler, reusing the
parent's KV through the radix cache. Trigger for now: custom_params["entropy_fork_at"] = i
forks the request once, at output token i, into rid ``<rid>-b1``."""

from __future__ import annotations

import copy
import logging
from array import array

from sglang.srt.plugins.hook_registry import HookType

logger = logging.getLogger(__name__)

FORK_KEY = "entropy_fork_at"
_TOKENIZED: dict = {}  # rid -> TokenizedGenerateReqInput of requests that may fork
_FORKED: set[str] = set()


def remember_request(scheduler, recv_req, *args, **kwargs):
    custom = getattr(recv_req.sampling_params, "custom_params", None) or {}
    if FORK_KEY in custom:
        _TOKENIZED[recv_req.rid] = recv_req


def fork_after_decode(result, scheduler, batch, batch_result, *args, **kwargs):
    if not batch.forward_mode.is_decode():
        return result
    for req in batch.reqs:
        recv = _TOKENIZED.get(req.rid)
        if recv is None or req.rid in _FORKED or req.finished() or not req.kv.holds_kv:
            continue
        fork_at = recv.sampling_params.custom_params[FORK_KEY]
        if len(req.output_ids) - 1 != fork_at:
            continue
        _FORKED.add(req.rid)
        shared = len(req.origin_input_ids) + fork_at  # prompt + output tokens before the fork
        req.refresh_fill_ids()
        scheduler.tree_cache.checkpoint(req, up_to=shared)
        child = copy.copy(recv)
        child.rid = f"{req.rid}-b1"
        child.input_ids = array("q", list(req.origin_input_ids) + list(req.output_ids[:fork_at]))
        child.input_text = None
        child.sampling_params = copy.copy(recv.sampling_params)
        child.sampling_params.max_new_tokens = recv.sampling_params.max_new_tokens - fork_at
        child.sampling_params.custom_params = {
            k: v for k, v in recv.sampling_params.custom_params.items() if k != FORK_KEY
        }
        logger.info("fork %s at %d -> %s (shared %d tokens)", req.rid, fork_at, child.rid, shared)
        scheduler.handle_generate_request(child)
    return result


def generate_with_forks(original, tokenizer_manager, obj, request=None):
    """Tokenizer side: register the child's rid before the parent starts, so its outputs
    are kept, and return [parent, child]."""
    custom = (obj.sampling_params or {}).get("custom_params") if isinstance(obj.sampling_params, dict) else None

    async def outputs():
        if not custom or FORK_KEY not in custom:
            async for out in original(tokenizer_manager, obj, request):
                yield out
            return
        import uuid

        obj.rid = obj.rid or uuid.uuid4().hex
        child = copy.copy(obj)
        child.rid = f"{obj.rid}-b1"
        child.normalize_batch_and_arguments()
        tokenizer_manager._init_req_state(child, request)
        child_state = tokenizer_manager.rid_to_state[child.rid]  # removed once its last output arrives
        parent = None
        async for out in original(tokenizer_manager, obj, request):
            parent = out
        forked = None
        async for out in tokenizer_manager._stream_one_response(obj=child, state=child_state, request=request):
            forked = out
        yield [parent, forked]

    return outputs()


HOOKS = (
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request", generate_with_forks, HookType.AROUND),
    ("sglang.srt.managers.scheduler.Scheduler.handle_generate_request", remember_request, HookType.BEFORE),
    ("sglang.srt.managers.scheduler.Scheduler.process_batch_result", fork_after_decode, HookType.AFTER),
)
