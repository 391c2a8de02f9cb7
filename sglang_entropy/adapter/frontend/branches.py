"""The tokenizer side of branching requests (policies registered with ``branches=True``): the
request's possible child rids are registered before it starts (SGLang drops outputs for rids it
does not know), and the response holds every sequence the scheduler forked
(``adapter.scheduler.branching``): a list of them, or, when the request streams, their outputs
as they come, each marked with the sequence's ``index`` (the root is 0; a child gets the next
index when the output whose fork event names it has been sent)."""

from __future__ import annotations

import contextlib
import copy
import uuid

from sglang_entropy.adapter.frontend.sequences import MergedSequences, SequenceOutputs, stream_mode
from sglang_entropy.registry import installed_policies


def is_branching_request(resolved) -> bool:
    options = resolved[0] if len(resolved) == 1 else None
    return options is not None and options.policy is not None and installed_policies().get(options.policy).spec.branches


def generate_with_branches(original, tokenizer_manager, obj, request, options, metrics):
    """Tokenizer side of a branching request: register every possible child rid, run the
    request, and follow each child that is forked (children may fork too)."""

    async def outputs():
        obj.rid = obj.rid if isinstance(obj.rid, str) else uuid.uuid4().hex
        mode = stream_mode(obj, tokenizer_manager)
        states = {}
        sequences = MergedSequences()
        started = [obj.rid]  # rid of each sequence, by index

        async def sequence(outputs, parent, branch_index):
            """One sequence's outputs, each with its place in the tree; a child starts after the
            output that announces it."""
            shaper = SequenceOutputs(options.label, mode)
            async with contextlib.aclosing(outputs) as items:
                async for output in items:
                    entropy = shaper.shape(output)
                    rid = output["meta_info"]["id"]
                    entropy["sequence"] = {"id": rid, "parent": parent, "branch_token_index": branch_index}
                    yield output, False
                    for event in entropy["events"]:
                        for child_rid in event.get("children", []):
                            child, state = states.pop(child_rid)
                            started.append(child_rid)
                            child_outputs = tokenizer_manager._stream_one_response(
                                obj=child, state=state, request=request
                            )
                            sequences.start(len(started) - 1, sequence(child_outputs, rid, event["token_index"]))

        last: dict[int, dict] = {}
        complete = False
        try:
            for k in range(1, options.params.max_sequences):
                child = copy.copy(obj)
                child.rid = f"{obj.rid}-b{k}"
                child.normalize_batch_and_arguments()
                states[child.rid] = (child, None)
                tokenizer_manager._init_req_state(child, request)
                states[child.rid] = (child, tokenizer_manager.rid_to_state[child.rid])
            sequences.start(0, sequence(original(tokenizer_manager, obj, request), None, None))
            async with contextlib.aclosing(sequences.items()) as items:
                async for output, _ in items:
                    last[output["index"]] = output
                    if obj.stream:
                        yield output
            complete = True
        finally:
            if not complete:  # failed or cancelled: no sequence of the request may run on uncollected
                tokenizer_manager.abort_request(rid=obj.rid)
            for rid in states:  # never forked
                tokenizer_manager.rid_to_state.pop(rid, None)
        metrics.sequences(len(started))
        if not obj.stream:
            outputs = [last[index] for index in range(len(started))]
            for output in outputs:
                del output["index"]
            yield outputs

    return outputs()
