"""Several STANDALONE drafters for one target (``--entropy-drafters``), on any platform.

An AFTER hook on SGLang's ``StandaloneWorkerV2.__init__`` puts a ``DrafterGroup`` in the place
of the worker's one drafter, so SGLang's own ``forward_batch_generation`` drafts, verifies and
extends as usual; the group asks the routing policy (``Router``) which chain to verify.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from sglang.srt.plugins.hook_registry import HookType
from sglang.srt.runtime_context import get_spec
from sglang.srt.speculative.standalone_worker_v2 import StandaloneDraftWorker

from sglang_entropy.adapter.scheduler.speculative import Router
from sglang_entropy.adapter.scheduler.state import STATE
from sglang_entropy.settings import ENV_DRAFTERS, parse_drafters
from sglang_entropy.types import RouteDecision

logger = logging.getLogger(__name__)


def install_group(result, worker, server_args=None, gpu_id=None, nccl_port=None, target_worker=None, **kwargs):
    """AFTER ``StandaloneWorkerV2.__init__``: with ``--entropy-drafters``, the worker's drafter
    becomes a group of all of them (a configuration that cannot route fails here, at start-up)."""
    paths = parse_drafters(os.environ.get(ENV_DRAFTERS, ""))
    if paths:
        worker._draft_worker = drafter_group(server_args, gpu_id, nccl_port, target_worker, worker._draft_worker, paths)


def drafter_group(server_args, gpu_id, nccl_port, target_worker, first, paths) -> "DrafterGroup":
    own = get_spec().speculative_draft_model_path
    if os.path.abspath(paths[0]) != os.path.abspath(own):
        raise ValueError(
            f"--entropy-drafters: the first drafter ({paths[0]}) must be --speculative-draft-model-path ({own})"
        )
    names = tuple(os.path.basename(os.path.normpath(p)) for p in paths)
    router = Router(names, options=STATE.options)  # fails here, at start-up, when no routing policy is enabled
    router.metrics = STATE.metrics
    STATE.router = router
    drafters = build_drafters(server_args, gpu_id, nccl_port, target_worker, first, paths)
    for drafter in drafters[1:]:
        vocab = drafter.draft_runner.model_config.vocab_size
        if vocab != target_worker.model_runner.model_config.vocab_size:
            raise ValueError(
                f"drafter {drafter.draft_runner.model_config.model_path} has vocab_size {vocab}; "
                "every drafter must share the target's vocabulary"
            )
    return DrafterGroup(drafters, names, router)


def build_drafters(server_args, gpu_id, nccl_port, target_worker, first, paths):
    """Drafter 0 is SGLang's own (``first``); the others load under a scoped override of the
    draft model path, which is where SGLang's model worker reads it. They are built as SGLang
    builds its drafter, so a platform's own drafter class applies to them too."""
    drafters = [first]
    for path in paths[1:]:
        with get_spec().override(speculative_draft_model_path=path):
            drafters.append(StandaloneDraftWorker(server_args, gpu_id, nccl_port, target_worker))
    return drafters


class _LogprobRecorder:
    """Wraps a draft runner's ``forward`` to keep each call's draft log-probability of the
    argmax token per row: SGLang's topk=1 chain path replaces it with ones on CPU."""

    def __init__(self, runner):
        self.rows: list[torch.Tensor] = []
        original = runner.forward

        def forward(*args, **kwargs):
            output = original(*args, **kwargs)
            logits = output.logits_output.next_token_logits
            self.rows.append(torch.log_softmax(logits.float(), dim=-1).max(dim=-1).values)
            return output

        runner.forward = forward


class DrafterGroup:
    """Several STANDALONE drafters for one target, in the place of SGLang's one drafter.

    Every drafter drafts its chain; the router picks one per request and only that chain is
    verified; then every drafter runs its draft extend on the accepted tokens, so all their KV
    caches stay in step. They share the target's ``req_to_token`` pool and allocator (each
    writes the same slot ids in its own KV buffer). Draft and draft extend rewrite the batch's
    fields, so every drafter but the last works on a copy of it (``_each``). The first guess of
    drafter d for the next step travels in column d of the draft input's ``topk_index`` / ``topk_p`` ([B, D]), which
    SGLang's ``filter_batch`` / ``merge_batch`` slice along the batch only; ``topk_p`` holds
    the real draft probability of that guess.
    """

    def __init__(self, drafters, names, router):
        self.drafters = drafters
        self.names = names
        self.router = router
        self.recorders = [_LogprobRecorder(d.draft_runner) for d in drafters]
        self.pending: RouteDecision | None = None  # this step's decision, recorded after verify

    def __getattr__(self, name):  # everything SGLang reads of "the" drafter: drafter 0
        return getattr(self.drafters[0], name)

    # --- set-up, called by SGLang's speculative worker for its one drafter ---------------------

    @property
    def preloaded_weights_bytes(self) -> int:
        return sum(d.preloaded_weights_bytes for d in self.drafters)

    def alloc_memory_pool(self, **kwargs):
        for drafter in self.drafters:
            drafter.alloc_memory_pool(**kwargs)

    def init_attention_backends(self):
        for drafter in self.drafters:
            drafter.init_attention_backends()

    def init_cuda_graphs(self):
        for drafter in self.drafters:
            drafter.init_cuda_graphs()

    # --- the speculative step ------------------------------------------------------------------

    def _each(self, batch, run):
        """``run(d, drafter, batch)`` for every drafter on the same batch state: the last one on
        SGLang's batch, whose changes stay (as with one drafter), the others on shallow copies
        (the fields they set are their own, and so are the input ids, which prefill's draft
        extend rotates in place)."""
        results = []
        last = len(self.drafters) - 1
        for d, drafter in enumerate(self.drafters):
            view = batch
            if d < last:
                view = copy.copy(batch)
                if batch.input_ids is not None:
                    view.input_ids = batch.input_ids.clone()
            self.recorders[d].rows.clear()
            results.append(run(d, drafter, view))
        return results

    def _draft_extend_for_prefill(self, batch, *args, **kwargs):
        def run(d, drafter, batch):
            draft_input = drafter._draft_extend_for_prefill(batch, *args, **kwargs)
            rows = self.recorders[d].rows[-1]
            if rows.shape[0] != draft_input.topk_index.shape[0]:
                raise RuntimeError(
                    f"draft extend for prefill gave {rows.shape[0]} logit rows for a batch of "
                    f"{draft_input.topk_index.shape[0]}"
                )
            return draft_input, rows

        results = self._each(batch, run)
        return self._combine([r[0] for r in results], [r[1] for r in results])

    def _combine(self, draft_inputs, first_logprobs):
        combined = draft_inputs[-1]
        combined.topk_index = torch.cat([x.topk_index for x in draft_inputs], dim=1)
        combined.topk_p = torch.stack(first_logprobs, dim=1).exp()
        return combined

    def draft(self, batch):
        spec_info = batch.spec_info

        def run(d, drafter, batch):
            batch.spec_info = copy.copy(spec_info)
            batch.spec_info.topk_index = spec_info.topk_index[:, d : d + 1]
            batch.spec_info.topk_p = spec_info.topk_p[:, d : d + 1]
            verify_input = drafter.draft(batch)
            # The chain's first token was guessed at the previous draft extend; the others here.
            later = self.recorders[d].rows
            logprobs = torch.stack([spec_info.topk_p[:, d].log(), *later], dim=1)
            return verify_input, logprobs

        results = self._each(batch, run)
        bs = spec_info.topk_index.shape[0]
        # draft_token per row: the last committed token, then the chain.
        tokens = torch.stack([v.draft_token.view(bs, -1) for v, _ in results])  # [D, B, 1 + N]
        logprobs = torch.stack([lp for _, lp in results])  # [D, B, N]
        try:
            decision = self.router.route(batch.reqs, tokens[:, :, 1:], logprobs)
        except Exception as e:  # the batch's requests fail with the cause; the server goes on
            decision = self._failed(batch.reqs, e, logprobs)
        self.pending = decision
        verify_input = results[-1][0]
        chosen = tokens.gather(0, decision.drafter.view(1, bs, 1).expand(1, bs, tokens.shape[2]))[0]
        verify_input.draft_token = chosen.reshape(-1)
        return verify_input

    @staticmethod
    def _failed(reqs, error, logprobs) -> RouteDecision:
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        logger.exception("routing speculative drafts failed")
        message = f"sglang-entropy: routing speculative drafts failed: {type(error).__name__}: {error}"
        for req in reqs:
            req.to_finish = FINISH_ABORT(message, status_code=500)
        # Drafter 0's chain is verified this once; the requests end after this step.
        bs = logprobs.shape[1]
        return RouteDecision(
            drafter=torch.zeros(bs, dtype=torch.int64, device=logprobs.device),
            confidence=torch.full(logprobs.shape[:2], float("nan"), device=logprobs.device),
        )

    def _draft_extend_for_decode(self, batch, batch_result, **kwargs):
        def run(d, drafter, batch):
            drafter._draft_extend_for_decode(batch, batch_result, **kwargs)
            draft_input = copy.copy(batch_result.next_draft_input)
            # Draft extend runs over num_draft_tokens rows per request; the last accepted one
            # predicts the next chain's first token (SGLang's select_index).
            ndt = drafter.speculative_num_draft_tokens
            rows = self.recorders[d].rows[-1]
            select = torch.arange(0, rows.shape[0], ndt, device=rows.device) + batch_result.accept_lens - 1
            return draft_input, rows[select]

        results = self._each(batch, run)
        batch_result.next_draft_input = self._combine([r[0] for r in results], [r[1] for r in results])
        if self.pending is not None and not batch.forward_mode.is_idle():
            # Read on the host in the scheduler's result processing (adapter.scheduler.speculative), where
            # SGLang copies accept_lens anyway: no sync inside the step.
            STATE.route_decisions[id(batch_result)] = (self.router, self.pending)
        self.pending = None


HOOK = ("sglang.srt.speculative.standalone_worker_v2.StandaloneWorkerV2.__init__", install_group, HookType.AFTER)
