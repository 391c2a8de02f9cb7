"""Requests that the portable CPU speculative path cannot serve, refused one by one.

Verification here is greedy only: SGLang's sampling verify (``eagle_sample``) calls CUDA
kernels that are ``None`` on this platform, and one sampled request in a batch would crash the
scheduler and with it every other request. The scheduler instead finishes such a request with
an abort naming the cause (the HTTP layer answers it with 400), before it is ever scheduled.
"""

from __future__ import annotations

from sglang_entropy.settings import SAMPLING_EPS as _SAMPLING_EPS  # SGLang samples greedily below it

NOT_GREEDY = (
    "speculative decoding on the portable CPU platform verifies greedily only: "
    "send temperature 0 (or top_k 1), or serve without --speculative-algorithm "
    "(got temperature={temperature}, top_k={top_k})"
)


def is_greedy(sampling_params) -> bool:
    # Before SGLang's normalisation temperature 0 marks greedy; after it, top_k 1 does.
    return sampling_params.temperature < _SAMPLING_EPS or sampling_params.top_k == 1


def refuse_sampled_request(result, scheduler, req, *args, **kwargs):
    """AFTER ``Scheduler.init_req_max_new_tokens``: every new request passes here, after its
    sampling parameters are set and before it is queued (SGLang's own validations use the
    same spot)."""
    if scheduler.spec_algorithm.is_none() or req.finished():
        return result
    params = req.sampling_params
    if not is_greedy(params):
        top_k = -1 if params.top_k >= 1 << 30 else params.top_k
        req.set_finish_with_abort(NOT_GREEDY.format(temperature=params.temperature, top_k=top_k))
    return result


HOOK = ("sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens", refuse_sampled_request)
