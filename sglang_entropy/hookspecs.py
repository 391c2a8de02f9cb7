"""The whole contract between sglang-entropy and its policy plugins.

A policy plugin is a Python package that exposes a module through the entry-point group
``sglang_entropy.policies``; the module implements the hooks below with
``@sglang_entropy.hookimpl``. ``register_policies`` registers each policy as a spec and an
object with one small interface per family (``DecodePolicy``, ``UnmaskPolicy``,
``RoutePolicy``, below); the adapter calls the object of the policy a request names.
Policies never see SGLang: the runtime adapter turns the engine's batches into the values of
``sglang_entropy.types`` and carries out the decisions.

Tensors live on the model's device. Per-step methods run inside the decode step: they must be
pure device code (no ``.item()``, ``.tolist()``, ``.cpu()`` or synchronisation) and batch over
every row. Lifecycle methods run on the scheduler's host thread, once per request; group
methods run in the HTTP server process (where the traces of a group meet), once per trace.
Both may use plain Python. Optional methods may be left out.

Composition: a request may name several decode policies (``custom_params.entropy.policies``,
a list of ``{policy, params}``); each is validated as if alone. At most one of them may branch
(``branches=True``) and at most one may form groups (``groups=True``); diffusion and
speculative policies decide alone. Every policy sees the request's rows in its own
``step.mask`` and its own parameters and state; the adapter merges their decisions per row:
the sequence stops if any policy stops it (each stopping policy gets its own stop event with
its reason and event values; the finish reason names them all), it forks the largest
``branch_width`` any of them asks for (the branch event names that policy), and logit biases
add. A group's hooks are the group policy's. Signal settings (``top_k``, ``window_size``,
``entropy_top_k``) are one per request: the value a policy's parameters set explicitly, and
two policies that set different values are refused.
"""

from __future__ import annotations

from typing import Protocol

import pluggy

hookspec = pluggy.HookspecMarker("sglang_entropy")
hookimpl = pluggy.HookimplMarker("sglang_entropy")


# --- registration --------------------------------------------------------------------------


@hookspec
def register_policies(register):
    """Register the plugin's policies.

    Called once per process when the core discovers plugins. ``register(spec, policy)`` adds
    a policy: ``spec`` is a ``PolicySpec`` whose name is what requests use
    (``custom_params.entropy.policy``) and what ``--entropy-policies`` enables; ``policy`` is
    the object that decides, with the interface of the spec's family. Registration checks both
    (parameters bounded, the family's method present). Returns nothing.
    """


@hookspec
def register_commands(commands):
    """Add the plugin's ``sglang-entropy`` subcommands: its benchmarks and its model builds.

    Called once when the ``sglang-entropy`` command starts (never in a server process).
    ``commands.add_bench(name, help)`` returns the argparse parser of ``sglang-entropy bench
    NAME``; ``commands.add_model(flag, help, build)`` adds ``sglang-entropy build-model FLAG``
    and returns that command's parser for further options (``build(args)`` returns the
    model's path). Set ``parser.set_defaults(func=run)``; ``run(args)`` returns the exit code.
    ``commands.add_demo_arm(DemoArm(name, policy, ask))`` adds the policy to the side-by-side
    that ``sglang-entropy demo`` runs against full sampling (``sglang_entropy.tools.commands``).
    Returns nothing.
    """


# --- (a) autoregressive decoding (family "decode") -------------------------------------------


class DecodePolicy(Protocol):
    """A policy that acts at every decode step (family ``"decode"``)."""

    def decode_step(self, step):
        """Decide for every sequence of the batch after its next-token logits are computed.

        Called at every decode step (and for the first token after prefill) while at least
        one running request uses the policy; ``step`` is a ``DecodeStep`` whose tensors cover
        the whole batch, [B] or [B, V], with ``step.mask`` selecting this policy's rows.
        Returns a ``DecodeDecision`` of [B] device tensors: continue (all defaults), stop with
        a reason, branch with a width, adjust the logits. Runs on the device without host syncs.
        """

    # Optional:

    def init_state(self, num_slots, device):
        """Allocate the policy's per-request state.

        Called once when the server starts, if the policy is enabled. ``num_slots`` is the
        number of request slots (SGLang's request pool, plus a scratch slot 0). Returns a dict
        of device tensors whose first dimension is ``num_slots``, or ``None``. The same dict is
        passed back as ``step.state`` and to the lifecycle methods.
        """

    def request_start(self, request, state):
        """Called when a request that uses the policy was given its slot, before its first
        token is sampled.

        ``request`` is a ``RequestInfo``; ``state`` is the dict from ``init_state``. Reset the
        slot's buffers here. A sequence forked by a branching policy then takes over its
        parent's rows of every state buffer (and of the group-confidence window), as they were
        before the token it forked at (the child samples that token again as its first), so the
        policy judges it by its whole trace, each token counted once. Returns nothing.
        """

    def request_end(self, request, reason, state):
        """Called when a request of the policy leaves its slot, on every path out: ``reason``
        is "finished", "aborted" or "retracted" (SGLang retracts under memory pressure and
        re-admits later, which calls ``request_start`` again). Free per-request state here.
        Returns nothing.
        """

    def group_trace_finished(self, group, trace):
        """Called when a trace of a group finishes (not when it was aborted).

        Groups exist for policies registered with ``groups=True``: a request with ``n`` > 1 is
        a group of ``n`` traces, and requests whose parameters share a ``group_id`` form one
        group. ``group`` is a ``TraceGroup`` (its ``finished`` list already holds ``trace``, a
        ``TraceSummary`` with the trace's per-token signals). Use it for warm-up calibration,
        consensus stops and budget reallocation. Returns a ``GroupUpdate``: its ``params``
        apply to every trace that starts later (validated again), ``stop_group`` aborts the
        group's running traces and starts no more; or ``None``.
        """

    def group_vote(self, group):
        """Combine the finished traces of ``group`` into one answer.

        Called when a request of the group completes, over the group's finished traces so
        far; the result is returned in each trace's ``meta_info["entropy"]["group"]["vote"]``.
        Returns a ``Vote``, or ``None`` to leave voting to the client.
        """


# --- (b) diffusion LMs (family "dllm") ---------------------------------------------------------


class UnmaskPolicy(Protocol):
    """A diffusion LM's unmasking rule (family ``"dllm"``, with a ``dllm_algorithm`` name).

    SGLang runs it for every request when launched with ``--dllm-algorithm NAME``; its
    parameters come from ``--dllm-algorithm-config``.
    """

    def unmask_step(self, step):
        """Choose which masked positions to commit at a denoising step.

        Called after every model forward of a block that still has masked positions, with a
        ``DenoiseStep`` ([B, L, V] logits, [B, L] masks; ``step.rows()`` gives each row's
        parameters as [B] tensors, for a request may set its own). Returns an ``UnmaskDecision``: a
        [B, L] bool of positions to commit, optionally a [B] bool early exit and the values to
        record in a debug trace. Device code only.
        """

    # Optional:

    def denoise_start(self, batch_size, block_size, params, device):
        """Allocate the policy's state for denoising a batch of blocks.

        Called on the scheduler's host thread before the first denoising step of each batch
        of blocks (``batch_size`` rows of ``block_size`` positions). Returns a dict of
        [B, ...] device tensors, passed back as ``step.state``, or ``None``. The state lives
        as long as those blocks.
        """


# --- (c) speculative decoding (family "speculative") ------------------------------------------


class RoutePolicy(Protocol):
    """Routes speculative drafts among several drafters (family ``"speculative"``)."""

    def route_drafts(self, proposals):
        """Pick, for every sequence, the drafter whose proposal goes to the target.

        Called at every speculative step with ``DraftProposals`` ([D, B, N] tokens and draft
        log-probabilities of D drafters, the rows' parameters and previous choices). Returns
        a ``RouteDecision``: [B] int64 drafter indices and optionally the [D, B] confidences
        they were chosen by. Device code only.
        """


FAMILIES = {"decode": DecodePolicy, "dllm": UnmaskPolicy, "speculative": RoutePolicy}
REQUIRED_METHOD = {"decode": "decode_step", "dllm": "unmask_step", "speculative": "route_drafts"}
