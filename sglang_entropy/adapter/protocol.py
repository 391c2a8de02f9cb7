"""The response format both of the adapter's processes share.

The scheduler puts one value per output token into ``req.customized_info`` (which SGLang
streams to the tokenizer manager) under SIGNAL_KEY + name and EVENTS_KEY; the HTTP server
process folds those keys into ``meta_info["entropy"]``. Finish reasons: a policy's stop,
a policy's failure, an invalid request.
"""

from __future__ import annotations

SIGNAL_KEY = "entropy.signal."  # + signal name: one value per output token
EVENTS_KEY = "entropy.events"  # one entry per output token: None or a list of events


class EntropyStop:
    """Finish reason of a request that its policies stopped (``stopped``: policy -> reason).

    It reports ``type: "stop"`` so OpenAI clients see a normal stop, and ``entropy_policy`` so
    a client can tell it apart from EOS and stop strings (``matched`` is null). When several
    policies of a composed request stopped it at once, ``entropy_policy`` and ``reason`` are
    the first's and ``stopped_by`` names them all.
    """

    def __init__(self, stopped: dict[str, str], token_index: int):
        self.stopped, self.token_index = stopped, token_index
        self.policy, self.reason = next(iter(stopped.items()))

    def to_json(self):
        out = {
            "type": "stop",
            "matched": None,
            "entropy_policy": self.policy,
            "reason": self.reason,
            "token_index": self.token_index,
        }
        if len(self.stopped) > 1:
            out["stopped_by"] = dict(self.stopped)
        return out


def policy_failure(policy: str, error: Exception):
    """Finish reason of a request whose policy (or the adapter's part in it) failed."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    return FINISH_ABORT(f"sglang-entropy ({policy}) failed: {type(error).__name__}: {error}", status_code=500)


def invalid_request(error: Exception):
    """Finish reason of a request whose entropy options reached the scheduler invalid."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    return FINISH_ABORT(f"sglang-entropy: invalid request: {error}", status_code=400)


def put_token_value(values: list, index: int, value) -> None:
    """Store the value of output token ``index``, padding tokens not seen with None."""
    if len(values) > index:
        values[index] = value
        return
    values.extend([None] * (index - len(values)))
    values.append(value)


def entropy_field(meta_info: dict, policy: str | None, offset: int) -> tuple[dict, int] | None:
    """Move the per-token keys out of ``meta_info`` into one ``entropy`` dict.

    Values before ``offset`` were already sent in earlier stream chunks. Returns the dict and
    the new offset, or None when the request asked for nothing.
    """
    signal_keys = [k for k in meta_info if k.startswith(SIGNAL_KEY)]
    if not signal_keys and EVENTS_KEY not in meta_info:
        return None
    signals = {k[len(SIGNAL_KEY) :]: meta_info.pop(k)[offset:] for k in signal_keys}
    per_token_events = meta_info.pop(EVENTS_KEY, [])[offset:]
    events = [event for token_events in per_token_events if token_events for event in token_events]
    end = offset + max([len(v) for v in signals.values()] + [len(per_token_events)])
    shaped = {"policy": policy, "signals": signals, "events": events}
    routes = [e for e in events if e.get("kind") == "route"]
    if routes:  # speculative decoding: mean tokens committed per verify step (bonus included)
        shaped["acceptance_length"] = sum(e["accepted"] for e in routes) / len(routes)
    blocks = [e for e in events if e.get("kind") == "block"]
    if blocks:  # a diffusion LM: forward passes of these tokens' blocks, prompt-only blocks included
        shaped["nfe"] = sum(e["nfe"] + e.get("prompt_nfe", 0) for e in blocks)
    return shaped, end
