"""The whole contract between sglang-entropy and its policy plugins.

A policy plugin is a Python package that exposes a module through the entry-point group
``sglang_entropy.policies``; the module implements some of these hooks with
``@sglang_entropy.hookimpl``. Policies never see SGLang: the runtime adapter turns the
engine's batches into the values below (``sglang_entropy.types``) and carries out the
decisions. Hooks that take a ``policy`` argument are called for every plugin until one answers
(``firstresult``): an implementation returns ``None`` for policies that are not its own.

Tensors live on the model's device. Per-step hooks run inside the decode step: they must be
pure device code (no ``.item()``, ``.tolist()``, ``.cpu()`` or synchronisation) and batch over
every row. Lifecycle hooks run on the scheduler's host thread, once per request; group hooks
run in the HTTP server process (where the traces of a group meet), once per trace. Both may
use plain Python.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("sglang_entropy")
hookimpl = pluggy.HookimplMarker("sglang_entropy")


# --- registration --------------------------------------------------------------------------


@hookspec
def register_policies(register):
    """Register the plugin's policies.

    Called once per process when the core discovers plugins. ``register(PolicySpec)`` adds a
    policy; its name is what requests use (``custom_params.entropy.policy``) and what
    ``--entropy-policies`` enables. Returns nothing.
    """


# --- (a) autoregressive decoding: the per-step hook -----------------------------------------


@hookspec(firstresult=True)
def init_state(policy, num_slots, device):
    """Allocate the policy's per-request state.

    Called once when the server starts, for each enabled policy. ``num_slots`` is the number
    of request slots (SGLang's request pool, plus a scratch slot 0). Returns a dict of device
    tensors whose first dimension is ``num_slots``, or ``None`` for a stateless policy. The
    same dict is passed back as ``step.state`` and to the lifecycle hooks.
    """


@hookspec(firstresult=True)
def decode_step(policy, step):
    """Decide for every sequence of the batch after its next-token logits are computed.

    Called at every decode step (and for the first token after prefill) while at least one
    running request uses ``policy``; ``step`` is a ``DecodeStep`` whose tensors cover the whole
    batch, [B] or [B, V], with ``step.mask`` selecting this policy's rows. Returns a
    ``DecodeDecision`` of [B] device tensors: continue (all defaults), stop with a reason,
    branch with a width, adjust the logits. Runs on the device without host syncs.
    """


# --- (b) request lifecycle and groups of traces ---------------------------------------------


@hookspec
def request_start(policy, request, state):
    """Called when a request that uses ``policy`` was given its slot, before its first token
    is sampled.

    ``request`` is a ``RequestInfo``; ``state`` is the policy's dict from ``init_state``.
    Reset the slot's buffers here. Returns nothing.
    """


@hookspec
def request_end(policy, request, reason, state):
    """Called when a request of ``policy`` leaves its slot, on every path out: ``reason`` is
    "finished", "aborted" or "retracted" (SGLang retracts under memory pressure and
    re-admits later, which calls ``request_start`` again). Free per-request state here.
    Returns nothing.
    """


@hookspec(firstresult=True)
def group_trace_finished(policy, group, trace):
    """Called when a trace of a group finishes (not when it was aborted).

    Groups exist for policies registered with ``groups=True``: a request with ``n`` > 1 is a
    group of ``n`` traces, and requests whose parameters share a ``group_id`` form one group.
    ``group`` is a ``TraceGroup`` (its ``finished`` list already holds ``trace``, a
    ``TraceSummary`` with the trace's per-token signals). Use it for warm-up calibration (set
    a threshold from the first traces), consensus stops and budget reallocation. Returns a
    ``GroupUpdate``: its ``params`` apply to every trace that starts later (validated again),
    ``stop_group`` aborts the group's running traces and starts no more; or ``None``.
    """


@hookspec(firstresult=True)
def group_vote(policy, group):
    """Combine the finished traces of ``group`` into one answer.

    Called when a request of the group completes, over the group's finished traces so far;
    the result is returned in each trace's ``meta_info["entropy"]["group"]["vote"]``. Returns
    a ``Vote``, or ``None`` to leave voting to the client.
    """


# --- (c) diffusion LMs -----------------------------------------------------------------------


@hookspec(firstresult=True)
def denoise_start(policy, batch_size, block_size, params, device):
    """Allocate the policy's state for denoising a batch of blocks.

    Diffusion policies are registered with ``family="dllm"`` and a ``dllm_algorithm`` name;
    SGLang runs them for every request when launched with ``--dllm-algorithm NAME`` (their
    ``params`` come from ``--dllm-algorithm-config``). Called on the scheduler's host thread
    before the first denoising step of each batch of blocks (``batch_size`` rows of
    ``block_size`` positions). Returns a dict of [B, ...] device tensors, passed back as
    ``step.state``, or ``None``. The state lives as long as those blocks.
    """


@hookspec(firstresult=True)
def unmask_step(policy, step):
    """Choose which masked positions to commit at a denoising step of a diffusion LM.

    Called after every model forward of a block that still has masked positions, with a
    ``DenoiseStep`` ([B, L, V] logits, [B, L] masks). Returns an ``UnmaskDecision``: a [B, L]
    bool of positions to commit, optionally a [B] bool early exit and the values to record in
    a debug trace. Device code only.
    """


# --- (d) speculative decoding ------------------------------------------------------------------


@hookspec(firstresult=True)
def route_drafts(policy, proposals):
    """Pick, for every sequence, the drafter whose proposal goes to the target for verification.

    Called at every speculative step with ``DraftProposals`` ([D, B, N] tokens and draft
    log-probabilities of D drafters, the rows' parameters and previous choices). Policies are
    registered with ``family="speculative"``. Returns a ``RouteDecision``: [B] int64 drafter
    indices and optionally the [D, B] confidences they were chosen by. Device code only.
    """
