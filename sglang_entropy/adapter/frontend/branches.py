"""The tokenizer side of branching requests (policies registered with ``branches=True``): the
request's possible child rids are registered before it starts (SGLang drops outputs for rids it
does not know), and the response lists every sequence the scheduler forked
(``adapter.scheduler.branching``)."""

from __future__ import annotations

import copy
import uuid

from sglang_entropy.adapter.protocol import entropy_field
from sglang_entropy.registry import installed_policies


def is_branching_request(resolved) -> bool:
    options = resolved[0] if len(resolved) == 1 else None
    return options is not None and options.policy is not None and installed_policies().get(options.policy).spec.branches


def generate_with_branches(original, tokenizer_manager, obj, request, options):
    """Tokenizer side of a branching request: register every possible child rid, run the
    request, then wait for each child that was forked (children may fork too)."""

    async def outputs():
        obj.rid = obj.rid if isinstance(obj.rid, str) else uuid.uuid4().hex
        states = {}
        sequences = []
        complete = False
        try:
            for k in range(1, options.params.max_sequences):
                child = copy.copy(obj)
                child.rid = f"{obj.rid}-b{k}"
                child.normalize_batch_and_arguments()
                states[child.rid] = (child, None)
                tokenizer_manager._init_req_state(child, request)
                states[child.rid] = (child, tokenizer_manager.rid_to_state[child.rid])
            async for out in original(tokenizer_manager, obj, request):
                root = out
            pending = [(root, None, None)]
            while pending:
                out, parent, branch_index = pending.pop(0)
                meta = out["meta_info"]
                shaped = entropy_field(meta, options.policy, 0)
                meta["entropy"] = shaped[0] if shaped else {"policy": options.policy, "signals": {}, "events": []}
                meta["entropy"]["sequence"] = {"parent": parent, "branch_token_index": branch_index}
                sequences.append(out)
                for event in meta["entropy"]["events"]:
                    for child_rid in event.get("children", []):
                        child, state = states.pop(child_rid)
                        async for child_out in tokenizer_manager._stream_one_response(
                            obj=child, state=state, request=request
                        ):
                            final = child_out
                        pending.append((final, meta["id"], event["token_index"]))
            complete = True
        finally:
            if not complete:  # failed or cancelled: no sequence of the request may run on uncollected
                tokenizer_manager.abort_request(rid=obj.rid)
            for rid in states:  # never forked
                tokenizer_manager.rid_to_state.pop(rid, None)
        yield sequences

    return outputs()
