"""Hooks in the HTTP server process: validate requests, shape ``meta_info["entropy"]``.

A request selects a policy only by registered name with parameters that its pydantic model
validates; anything else is answered with HTTP 400 naming the field, and only that request
fails.
"""

from __future__ import annotations

import json

from sglang.srt.plugins.hook_registry import HookType

from sglang_entropy.adapter.frontend import branches, groups
from sglang_entropy.adapter.frontend.state import FRONTEND
from sglang_entropy.adapter.protocol import entropy_field
from sglang_entropy.registry import installed_policies
from sglang_entropy.settings import PREFIX, REQUEST_KEY, EntropyRequestError, ResolvedRequest
from sglang_entropy.types import GroupParams


def _policy_label(options: ResolvedRequest | None, tokenizer_manager, routed: bool) -> str | None:
    """The policy a prompt's ``meta_info["entropy"]`` names: its own; on a diffusion server the
    launched algorithm's; on a drafter server its routing policy or the default one."""
    if options is not None and len(options.composed) > 1:
        return options.label
    policy = options.policy if options else None
    algorithm = tokenizer_manager.server_args.dllm_algorithm
    if policy is None and algorithm is not None:
        policy = installed_policies().dllm_policies().get(algorithm)
    routing = policy is not None and installed_policies().get(policy).spec.family == "speculative"
    if routed and not routing:
        policy = FRONTEND.settings.default_routing_policy(installed_policies())
    return policy


def resolve_all(sampling_params) -> list[ResolvedRequest | None]:
    """Validate the entropy options of every prompt of a request (raises EntropyRequestError).

    Sampling fields of the wrong type are read as their defaults here: SGLang refuses them
    itself, with its own 400, once this check passes."""
    if sampling_params is None:
        return []
    items = sampling_params if isinstance(sampling_params, list) else [sampling_params]
    resolved = []
    for params in items:
        params = params if isinstance(params, dict) else {}
        n = _number(params.get("n"), int) or 1
        temperature = _number(params.get("temperature"), float)
        resolved.append(
            FRONTEND.settings.resolve(
                params.get("custom_params"),
                installed_policies(),
                n=n,
                temperature=1.0 if temperature is None else temperature,
                top_k=_number(params.get("top_k"), int),
            )
        )
    return resolved


def _number(value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value) if kind is float or float(value).is_integer() else None


def runs_sequences(options: ResolvedRequest | None, n: int) -> bool:
    """Whether one prompt's request runs several sequences that the adapter collects: a group
    of traces or a branching policy."""
    if options is None or options.policy is None:
        return False
    return groups.forms_group(options, n) or installed_policies().get(options.policy).spec.branches


def tokenizer_workers() -> int:
    from sglang.srt.runtime_context import get_serving

    try:
        return get_serving().tokenizer_worker_num or 1
    except Exception:  # outside a server (unit tests)
        return 1


def check_where_groups_meet(resolved: list[ResolvedRequest | None]) -> None:
    """Named groups meet in one HTTP server process: with several tokenizer workers the
    requests of a ``group_id`` would land on different workers, so they are refused (a group
    of ``n`` traces in one request works anywhere)."""
    workers = tokenizer_workers()
    if workers > 1 and any(o is not None and isinstance(o.params, GroupParams) and o.params.group_id for o in resolved):
        raise EntropyRequestError(
            f"custom_params.{REQUEST_KEY}.params.group_id: named groups meet in one HTTP server process, and this "
            f"server runs {workers} tokenizer workers (--tokenizer-worker-num); send the group as one request "
            "with n > 1, or serve with one tokenizer worker"
        )


def check_decoding(resolved: list[ResolvedRequest | None], server_args) -> None:
    """What the server's way of decoding cannot give (raises EntropyRequestError naming the
    field): SGLang runs no sampling observer with speculative decoding or a diffusion LM, so
    there are no per-token signals and no decode-step policies there (a drafter server's
    routing and a diffusion server's unmasking run in their own hooks)."""
    speculative, dllm = server_args.speculative_algorithm, server_args.dllm_algorithm
    launched = f"--speculative-algorithm {speculative}" if speculative else f"--dllm-algorithm {dllm}"
    for options in resolved:
        if options is None:
            continue
        if (speculative or dllm) and options.return_signals:
            raise EntropyRequestError(
                f"{PREFIX}.return_signals: this server decodes with {launched}, where SGLang computes no "
                "per-token distribution to take signals from; ask a server without it"
            )
        if (speculative or dllm) and options.policy is not None:
            family = installed_policies().get(options.policy).spec.family
            if family == "decode":
                raise EntropyRequestError(
                    f"{PREFIX}.policy: {options.policy!r} acts at every decode step, which a server launched "
                    f"with {launched} does not run"
                )
        if options.dllm_trace and not dllm:
            raise EntropyRequestError(
                f"{PREFIX}.dllm_trace: this server runs no diffusion LM (--dllm-algorithm), so there is no "
                "denoising to trace"
            )


def check_form(obj, resolved: list[ResolvedRequest | None], server_args) -> None:
    """A /generate request that runs several sequences takes one prompt with one set of
    sampling parameters, and asks only for what the server's decoding gives (raises
    EntropyRequestError naming the form)."""
    per_prompt = groups.sampling_params_list(obj.sampling_params)
    multi = [
        runs_sequences(options, _number(per_prompt[min(i, len(per_prompt) - 1)].get("n"), int) or 1)
        for i, options in enumerate(resolved)
    ]
    if any(multi):
        groups.check_group_form(isinstance(obj.sampling_params, dict) and groups.single_prompt(obj))
    check_where_groups_meet(resolved)
    check_decoding(resolved, server_args)


def _merge(pending: dict | None, new: dict) -> dict:
    if pending is None:
        return new
    for name, values in new["signals"].items():
        pending["signals"].setdefault(name, []).extend(values)
    pending["events"].extend(new["events"])
    pending.update({key: value for key, value in new.items() if key not in ("signals", "events")})
    return pending


def _to_openai_stream(obj, index: int, entropy: dict) -> None:
    """Hold an output's entropy values for the OpenAI stream chunk of its choice, if the request
    is an OpenAI stream (``openai_stream``)."""
    pending = FRONTEND.openai_streams.get(id(obj))
    if pending is not None:
        pending[index] = _merge(pending.get(index), entropy)


def generate_request(original, tokenizer_manager, obj, request=None):
    """Wrap TokenizerManager.generate_request (an async generator)."""

    async def outputs():
        resolved = resolve_all(getattr(obj, "sampling_params", None))
        check_form(obj, resolved, tokenizer_manager.server_args)
        for options in resolved:
            for policy in options.policies if options is not None else ():
                FRONTEND.metrics.request(policy)
        if branches.is_branching_request(resolved):
            scope = groups.client_scope(request, FRONTEND.settings.config.groups, "budget_group", resolved[0].params)
            ranks = getattr(tokenizer_manager, "elastic_worker_count", 1) or 1  # data-parallel ranks
            async with FRONTEND.groups.budget_group(obj, resolved[0], scope, ranks):
                async for out in branches.generate_with_branches(
                    original, tokenizer_manager, obj, request, resolved[0], FRONTEND.metrics
                ):
                    if obj.stream:
                        _to_openai_stream(obj, out["index"], out["meta_info"]["entropy"])
                    yield out
            return
        n = _number(groups.sampling_params_list(obj.sampling_params)[0].get("n"), int) or 1
        if groups.is_group_request(resolved, n):
            scope = groups.client_scope(request, FRONTEND.settings.config.groups, "group_id", resolved[0].params)
            async for out in groups.run(
                original, tokenizer_manager, obj, request, resolved[0], n, scope, FRONTEND.groups
            ):
                if obj.stream:
                    _to_openai_stream(obj, out["index"], out["meta_info"]["entropy"])
                yield out
            return
        routed = bool(FRONTEND.settings.drafters)  # every request of a drafter server is routed
        if not any(resolved) and tokenizer_manager.server_args.dllm_algorithm is None and not routed:
            async for out in original(tokenizer_manager, obj, request):
                yield out
            return
        cumulative = obj.stream and not tokenizer_manager.incremental_streaming_output
        offsets: dict[int, int] = {}
        labels = [_policy_label(options, tokenizer_manager, routed) for options in resolved or [None]]
        async for out in original(tokenizer_manager, obj, request):
            for position, item in enumerate(out if isinstance(out, list) else [out]):
                index = item.get("index", position)
                policy = labels[index] if index < len(labels) else labels[0]
                shaped = entropy_field(item.get("meta_info", {}), policy, offsets.get(index, 0))
                if shaped is not None:
                    item["meta_info"]["entropy"], end = shaped
                    if cumulative:
                        offsets[index] = end
                    _to_openai_stream(obj, index, item["meta_info"]["entropy"])
            yield out

    return outputs()


async def serve_generate_request(original, obj, request):
    """Answer invalid entropy options of /generate with 400 before a stream starts."""
    from sglang.srt.entrypoints.http_server import _global_state

    try:
        check_form(obj, resolve_all(obj.sampling_params), _global_state.tokenizer_manager.server_args)
    except EntropyRequestError as e:
        from fastapi.responses import ORJSONResponse

        return ORJSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)
    return await original(obj, request)


def abort_request(original, tokenizer_manager, rid: str = "", abort_all: bool = False):
    """TokenizerManager.abort_request: a group request's rid aborts all its traces."""
    return FRONTEND.groups.abort(original, tokenizer_manager, rid=rid, abort_all=abort_all)


def validate_openai_request(original, serving, request):
    error = original(serving, request)
    if error is not None:
        return error
    custom = getattr(request, "custom_params", None)
    n = getattr(request, "n", 1) or 1
    try:
        options = FRONTEND.settings.resolve(
            custom,
            installed_policies(),
            n=n,
            temperature=getattr(request, "temperature", None),
            top_k=getattr(request, "top_k", None),
        )
        if runs_sequences(options, n):
            prompt = getattr(request, "prompt", None)  # completions; chat requests have one conversation
            single = not (isinstance(prompt, list) and prompt and not isinstance(prompt[0], int))
            groups.check_group_form(single)
        check_where_groups_meet([options])
        check_decoding([options], serving.tokenizer_manager.server_args)
    except EntropyRequestError as e:
        return str(e)
    return None


def add_openai_metadata(response, serving, request, ret, created):
    """OpenAI responses carry ``metadata.entropy``: one ``meta_info["entropy"]`` per choice."""
    per_choice = [item.get("meta_info", {}).get("entropy") for item in ret]
    if any(per_choice) and hasattr(response, "metadata"):
        response.metadata = {**(response.metadata or {}), "entropy": per_choice}
    return response


def openai_stream(original, serving, adapted_request, *args, **kwargs):
    """Wrap an OpenAI stream generator: each SSE chunk gets ``metadata.entropy``, one entry
    per choice in the chunk, holding the values of the tokens new since that choice's
    previous chunk."""

    async def chunks():
        pending: dict[int, dict] = {}
        FRONTEND.openai_streams[id(adapted_request)] = pending
        try:
            async for sse in original(serving, adapted_request, *args, **kwargs):
                yield _attach_entropy(sse, pending)
        finally:
            FRONTEND.openai_streams.pop(id(adapted_request), None)

    return chunks()


def _attach_entropy(sse: str, pending: dict[int, dict]) -> str:
    if not pending or not sse.startswith("data: {"):
        return sse
    chunk = json.loads(sse[len("data: ") :])
    choices = chunk.get("choices") or []
    entries = [pending.pop(choice.get("index", 0), None) for choice in choices]
    if not any(entries):
        return sse
    chunk["metadata"] = {**(chunk.get("metadata") or {}), "entropy": entries}
    return f"data: {json.dumps(chunk)}\n\n"


_OPENAI = "sglang.srt.entrypoints.openai"
_COMPLETIONS = f"{_OPENAI}.serving_completions.OpenAIServingCompletion"
_CHAT = f"{_OPENAI}.serving_chat.OpenAIServingChat"
HOOKS = (
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request", generate_request, HookType.AROUND),
    ("sglang.srt.entrypoints.http_server.serve_generate_request", serve_generate_request, HookType.AROUND),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.abort_request", abort_request, HookType.AROUND),
    (f"{_COMPLETIONS}._validate_request", validate_openai_request, HookType.AROUND),
    (f"{_CHAT}._validate_request", validate_openai_request, HookType.AROUND),
    (f"{_COMPLETIONS}._build_completion_response", add_openai_metadata, HookType.AFTER),
    (f"{_CHAT}._build_chat_response", add_openai_metadata, HookType.AFTER),
    (f"{_COMPLETIONS}._generate_completion_stream", openai_stream, HookType.AROUND),
    (f"{_CHAT}._generate_chat_stream", openai_stream, HookType.AROUND),
)
