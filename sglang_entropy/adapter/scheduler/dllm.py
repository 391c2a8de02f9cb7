"""Diffusion LMs: unmasking policies as SGLang dLLM algorithms, and NFE in every response.

SGLang finds dLLM algorithms only among its own modules (``algo_name_to_cls``). An AROUND hook
on ``get_algorithm_cls`` adds one algorithm per installed policy of family ``"dllm"``, under the
policy's ``dllm_algorithm`` name, so ``--dllm-algorithm CCD`` works from a separately installed
package. That algorithm builds a ``DenoiseStep`` from the block's logits and carries out the
policy's ``UnmaskDecision``.

For every dLLM server with the adapter enabled, whatever its algorithm, the forward passes of
each block are counted per request (the forwards until that request's block was finished) and
returned as one ``{"kind": "block", "nfe": ...}`` event on the block's first token; the
tokenizer side sums them into ``meta_info["entropy"]["nfe"]``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from sglang.srt.dllm.algorithm.base import DllmAlgorithm
from sglang.srt.plugins.hook_registry import HookType

from sglang_entropy.adapter.protocol import EVENTS_KEY, invalid_request, policy_failure, put_token_value
from sglang_entropy.adapter.scheduler.state import STATE
from sglang_entropy.registry import installed_policies
from sglang_entropy.settings import describe_errors
from sglang_entropy.types import DenoiseStep, param_rows

logger = logging.getLogger(__name__)


def get_algorithm_cls(original, name: str):
    policy = installed_policies().dllm_policies().get(name)
    if policy is None:
        return original(name)
    return _algorithm_class(name, policy)


@functools.cache
def _algorithm_class(algorithm_name: str, policy: str):
    """The SGLang dLLM algorithm named ``algorithm_name`` that runs ``policy``."""
    return type(algorithm_name, (PolicyUnmasking,), {"policy": policy})


class PolicyUnmasking(DllmAlgorithm):
    """Denoise each block with the policy's ``unmask_step`` decisions.

    Works in both of SGLang's modes: synchronous (every block of the batch is denoised to
    the end in one call) and first-done-first-out (one step per call; SGLang carries each
    request's ``BlockState`` to the next call). Rows are stacked into [B, ...] tensors for
    the policy and split back after it, on the device.
    """

    policy: str  # set per algorithm name by ``_algorithm_class``

    def __init__(self, config):
        super().__init__(config)
        self.registry = installed_policies()
        self.params = _validate_params(self.policy, config.algorithm_config)
        self.trace_rows: list[bool] = []  # set per call by ``count_forwards``
        self.request_params: list = []  # each row's parameters, set per call by ``count_forwards``
        self.row_params: dict[str, torch.Tensor] | None = None  # the same as [B] tensors, made at the call's first step
        self.rows: list[BlockState] = []  # the states of the last step's rows
        self.failure: Exception | None = None

    def init_step_state(self, forward_batch):
        device = forward_batch.input_ids.device
        batch_size = forward_batch.batch_size
        start = getattr(self.registry.policy(self.policy), "denoise_start", None)
        state = start(batch_size, self.block_size, self.params, device) if start else None
        state = state or {}
        return [
            BlockState.fresh({k: v[row] for k, v in state.items()}, self.block_size, device)
            for row in range(batch_size)
        ]

    def step(self, forward_batch, full_logits, states):
        rows: list[BlockState] = states
        self.rows = rows
        batch_size, block = forward_batch.batch_size, self.block_size
        logits = full_logits.view(batch_size, block, -1)
        input_ids = forward_batch.input_ids.view(batch_size, block)
        masked = input_ids == self.mask_id
        if forward_batch.dllm_prompt_mask is not None:
            masked &= ~forward_batch.dllm_prompt_mask
        done = masked.sum(dim=1) == 0
        batch = BlockState.stack(rows, masked)
        commit, exit_now, trace = self._decide(batch, logits, masked)
        predicted = logits.argmax(dim=-1)
        forward_batch.input_ids.copy_(torch.where(commit, predicted, input_ids).view(-1))
        batch.commit_step = torch.where(commit, batch.steps[:, None], batch.commit_step)
        first_exit = exit_now & (batch.exit_step < 0)
        batch.exit_step = torch.where(first_exit, batch.steps, batch.exit_step)
        batch.steps = batch.steps + 1
        traced = None
        if any(self.trace_rows):
            traced = {**trace, "masked": masked, "commit": commit, "predicted": predicted}
        batch.split_into(rows, traced, self.trace_rows)
        return done.tolist()  # SGLang's loop needs the host bools (one sync per step, its design)

    def _rows(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        """Each row's parameters as [B] tensors, once per call; empty when every row has the
        launch's (the policy then reads ``params``)."""
        if self.row_params is None:
            own = len(self.request_params) == batch_size and any(p is not self.params for p in self.request_params)
            self.row_params = param_rows(self.request_params, device) if own else {}
        return self.row_params

    def _decide(self, batch: "BlockState", logits, masked):
        step = DenoiseStep(
            logits=logits,
            masked=masked,
            canvas=batch.canvas,
            step_index=batch.steps,
            max_steps=self.max_steps(self.block_size),
            params=self.params,
            state=batch.policy_state,
            row_params=self._rows(logits.shape[0], logits.device),
        )
        no_exit = torch.zeros_like(masked[:, 0])
        try:
            decision = self.registry.policy(self.policy).unmask_step(step)
            commit = decision.commit & masked
            exit_now = no_exit if decision.exit is None else decision.exit & masked.any(dim=1)
            trace = dict(decision.trace)
        except Exception as e:  # fail these requests, finish the block so the batch goes on
            logger.exception("dLLM policy %s failed", self.policy)
            self.failure = e
            commit, exit_now, trace = masked.clone(), no_exit, {}
        commit |= exit_now[:, None] & masked
        return _ensure_progress(commit, masked, logits), exit_now, trace


def _validate_params(policy: str, algorithm_config: dict):
    from pydantic import ValidationError

    spec = installed_policies().get(policy).spec
    values = {k: v for k, v in algorithm_config.items() if k not in ("block_size", "capture_input_preparation")}
    try:
        return spec.params.model_validate(values)
    except ValidationError as e:
        raise ValueError(
            f"--dllm-algorithm-config for {spec.dllm_algorithm} ({policy}): {describe_errors(e, 'config')}"
        ) from None


def _ensure_progress(commit: torch.Tensor, masked: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Rows with masked positions but nothing to commit take their most probable masked position."""
    stalled = masked.any(dim=1) & ~commit.any(dim=1)  # [B]
    log_confidence = logits.amax(dim=-1) - logits.logsumexp(dim=-1)  # [B, L], log of the top probability
    confidence = log_confidence.masked_fill(~masked, -torch.inf)
    best = torch.zeros_like(commit).scatter_(1, confidence.argmax(dim=1, keepdim=True), True)
    return commit | (best & stalled[:, None])


@dataclass
class BlockState:
    """One request's block while it is denoised; tensors stay on the device.

    As a batch (``stack``) the same fields hold [B, ...] tensors.
    """

    policy_state: dict  # the policy's buffers for this row (views of ``denoise_start``'s)
    steps: torch.Tensor  # [] int64, steps taken on this block
    commit_step: torch.Tensor  # [L] int64, the step that committed each position, -1 not yet
    exit_step: torch.Tensor  # [] int64, the step of the early exit, -1 none
    canvas: torch.Tensor | None = None  # [L] bool, positions masked at the block's first step
    trace: list = field(default_factory=list)  # per step: dict of this row's traced values

    @classmethod
    def fresh(cls, policy_state: dict, block_size: int, device) -> "BlockState":
        return cls(
            policy_state,
            steps=torch.zeros((), dtype=torch.int64, device=device),
            commit_step=torch.full((block_size,), -1, dtype=torch.int64, device=device),
            exit_step=torch.full((), -1, dtype=torch.int64, device=device),
        )

    @classmethod
    def stack(cls, rows: list["BlockState"], masked: torch.Tensor) -> "BlockState":
        for row, row_masked in zip(rows, masked, strict=True):
            if row.canvas is None:
                row.canvas = row_masked.clone()
        keys = rows[0].policy_state.keys()
        return cls(
            {k: torch.stack([r.policy_state[k] for r in rows]) for k in keys},
            steps=torch.stack([r.steps for r in rows]),
            commit_step=torch.stack([r.commit_step for r in rows]),
            exit_step=torch.stack([r.exit_step for r in rows]),
            canvas=torch.stack([r.canvas for r in rows]),
        )

    def split_into(self, rows: list["BlockState"], traced: dict | None, trace_rows: list[bool]) -> None:
        for i, row in enumerate(rows):
            row.policy_state = {k: v[i] for k, v in self.policy_state.items()}
            row.steps, row.commit_step, row.exit_step = self.steps[i], self.commit_step[i], self.exit_step[i]
            if traced is not None and i < len(trace_rows) and trace_rows[i]:
                row.trace.append({k: v[i] for k, v in traced.items()})

    def report(self, new_tokens: int) -> dict:
        """The block's record for its event (host transfer once, when the block is finished)."""
        offset = self.commit_step.shape[0] - new_tokens  # the block's prompt positions come first
        exit_step = int(self.exit_step)
        out = {"commit_steps": self.commit_step[offset:].tolist(), "exit_step": None if exit_step < 0 else exit_step}
        if self.trace:
            out["trace"] = [{k: v.tolist() for k, v in step.items()} for step in self.trace]
        return out


@dataclass
class RunRecord:
    """What one call of the dLLM algorithm leaves for the scheduler's result processing."""

    row_nfe: list[int]  # forwards each row took part in until its block was done
    rows: list[BlockState] | None = None  # our algorithms: each row's block state
    failure: Exception | None = None


def count_forwards(original, worker, forward_batch, batch=None):
    """AROUND ``TpModelWorker._forward_batch_generation_dllm``: count each row's forward passes."""
    runner, algorithm = worker.model_runner, worker.dllm_algorithm
    forwards = 0
    done_after: list[int | None] = [None] * forward_batch.batch_size
    forward, step = runner.forward, algorithm.step

    def counted_forward(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return forward(*args, **kwargs)

    def recorded_step(*args, **kwargs):
        done = step(*args, **kwargs)
        for row, finished in enumerate(done):
            if finished and done_after[row] is None:
                done_after[row] = forwards
        return done

    ours = hasattr(algorithm, "trace_rows")
    if ours:
        reqs = batch.reqs if batch is not None else []
        algorithm.trace_rows = [_wants_trace(req) for req in reqs]
        algorithm.request_params = [_request_params(algorithm, req) for req in reqs]
        algorithm.row_params = None
        algorithm.rows, algorithm.failure = [], None
    runner.forward, algorithm.step = counted_forward, recorded_step
    try:
        result = original(worker, forward_batch, batch)
    finally:
        del runner.forward, algorithm.step
    record = RunRecord(row_nfe=[forwards if n is None else n for n in done_after])
    if ours:
        record.rows, record.failure = list(algorithm.rows) or None, algorithm.failure
    STATE.dllm_run = record
    return result


def _request_params(algorithm: PolicyUnmasking, req):
    """The parameters a request's rows run with: its ``custom_params.entropy.params`` over the
    launch's, checked together once per request; a request whose combination is invalid is
    aborted with the reason (HTTP 400) and its block finishes with the launch's."""
    if req.rid in STATE.dllm_params:
        return STATE.dllm_params[req.rid]
    try:
        options = STATE.options(req)
    except ValueError:  # the request is aborted when it gets its slot
        options = None
    params = algorithm.params
    if options is not None and options.dllm_params:
        from pydantic import ValidationError

        values = {**algorithm.params.model_dump(), **options.dllm_params}
        try:
            params = type(algorithm.params).model_validate(values)
        except ValidationError as e:
            req.to_finish = invalid_request(ValueError(describe_errors(e, "custom_params.entropy.params")))
    STATE.dllm_params[req.rid] = params
    return params


def _wants_trace(req) -> bool:
    try:
        options = STATE.options(req)
    except ValueError:  # the request is aborted when it gets its slot
        return False
    return options is not None and options.dllm_trace


def _new_tokens(scheduler, req, result, row: int) -> int | None:
    """Generated tokens this call finished for the row's block: None while the block is still
    being denoised (first-done-first-out), 0 for a block of prompt tokens only."""
    block = scheduler.dllm_config.block_size
    if not scheduler.dllm_config.first_done_first_out_mode:
        return len(result.next_token_ids[row]) if result.next_token_ids else 0
    if result.accept_length_per_req_cpu[row] == 0:
        return None
    generated = req.extend_end - len(req.origin_input_ids)
    return max(0, min(block, generated))


def attach_blocks(scheduler, batch, result):
    """BEFORE ``process_batch_result_dllm``: one block event per request on its block's first token."""
    record, STATE.dllm_run = STATE.dllm_run, None
    if record is None:
        return
    policy = installed_policies().dllm_policies().get(scheduler.dllm_config.algorithm)
    for row, req in enumerate(batch.reqs):
        if record.failure is not None:  # SGLang applies it when the request's block is committed
            req.to_finish = policy_failure(policy or scheduler.dllm_config.algorithm, record.failure)
            STATE.metrics.failure(policy or scheduler.dllm_config.algorithm)
        STATE.block_nfe[req.rid] = STATE.block_nfe.get(req.rid, 0) + record.row_nfe[row]
        new_tokens = _new_tokens(scheduler, req, result, row)
        if new_tokens is None:
            continue
        nfe = STATE.block_nfe.pop(req.rid)
        if new_tokens == 0:  # charged to the request's first generated block
            STATE.prompt_nfe[req.rid] = STATE.prompt_nfe.get(req.rid, 0) + nfe
            continue
        event = {"kind": "block", "nfe": nfe, "start": len(req.output_ids), "tokens": new_tokens}
        STATE.metrics.dllm_block(nfe)
        prompt_nfe = STATE.prompt_nfe.pop(req.rid, 0)
        if prompt_nfe:
            event["prompt_nfe"] = prompt_nfe
        if record.rows is not None and row < len(record.rows):
            event.update(record.rows[row].report(new_tokens))
        req.customized_info = req.customized_info or {}
        put_token_value(req.customized_info.setdefault(EVENTS_KEY, []), len(req.output_ids), [event])


HOOKS = (
    ("sglang.srt.managers.tp_worker.TpModelWorker._forward_batch_generation_dllm", count_forwards, HookType.AROUND),
    ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_batch_result_dllm", attach_blocks, HookType.BEFORE),
)
ALGORITHM_HOOK = ("sglang.srt.dllm.algorithm.get_algorithm_cls", get_algorithm_cls, HookType.AROUND)
