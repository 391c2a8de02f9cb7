"""Plain-Python reference of the CCD rule with SchED exit, one block at a time.

It replays a block from what was seen at each step (scores, argmax tokens, logit margins) and
returns what the rule commits, so the device implementation (unit tests) and the server's debug
trace (end-to-end tests) can both be checked against it.
"""

import math


def threshold(schedule: str, high: float, low: float, rate: float, progress: float) -> float:
    p = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return high - (high - low) * p
    if schedule == "cosine":
        return low + (high - low) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "exponential":
        return low + (high - low) * math.exp(-rate * p)
    return math.inf


class CCDReference:
    """The rule's state for one block; ``step`` returns the positions committed at that step."""

    def __init__(self, params: dict, block_size: int, max_steps: int):
        self.p = {
            "budget": 1,
            "expand_ratio": 4.0,
            "warmup_steps": 1,
            "reset_share": 0.1,
            "adaptive": True,
            "early_exit": "none",
            "exit_tau_high": 6.0,
            "exit_tau_low": 2.0,
            "exit_rate": 3.0,
            **params,
        }
        self.block_size, self.max_steps = block_size, max_steps
        self.t, self.set_size = 0, 1
        self.previous: dict[int, int] = {}  # candidate position -> its argmax token

    def step(self, masked: set[int], score: list[float], predicted: list[int], margin: list[float]):
        """Returns (commit, matched, candidates, exit)."""
        p = self.p
        budget = p["budget"]
        ranking = sorted(masked, key=lambda i: (-score[i], i))
        candidates = ranking[: self.set_size]
        matched = {i for i in candidates if i in self.previous and self.previous[i] == predicted[i]}
        adaptive = p["adaptive"] and self.t >= p["warmup_steps"] and len(matched) >= budget
        commit = set(matched) if adaptive else set(ranking[:budget])
        mean_margin = sum(margin[i] for i in masked) / len(masked) if masked else 0.0
        tau = threshold(p["early_exit"], p["exit_tau_high"], p["exit_tau_low"], p["exit_rate"], self.t / self.max_steps)
        exit_now = bool(masked) and mean_margin >= tau
        if exit_now:
            commit = set(masked)
        left = len(masked - commit)
        max_set = budget + math.floor(budget * p["expand_ratio"])
        self.set_size = 1 if left <= p["reset_share"] * self.block_size else min(self.set_size + 1, max_set)
        self.previous = {i: predicted[i] for i in candidates}
        self.t += 1
        return commit, matched, set(candidates), exit_now


def check_trace(trace: list[dict], params: dict, block_size: int, max_steps: int) -> None:
    """Assert that a block's debug trace follows the rule at every step (raises AssertionError).

    The trace holds the exact float32 scores the server ranked, so the replay ranks them the
    same way (ties: lower position first, as the device's stable sort does).
    """
    ref = CCDReference(params, block_size, max_steps)
    for t, step in enumerate(trace):
        masked = {i for i, m in enumerate(step["masked"]) if m}
        if not masked:  # the forward after the last commit: nothing to decide
            assert not any(step["commit"]), f"step {t}: committed with nothing masked"
            continue
        margins = [step.get("margin", 0.0)] * block_size  # the trace holds the mean; replay it as is
        commit, matched, candidates, exit_now = ref.step(masked, step["score"], step["predicted"], margins)
        got = {i for i, c in enumerate(step["commit"]) if c}
        if step.get("tau") is not None:  # null: no early exit (an infinite threshold)
            assert exit_now == (step["margin"] >= step["tau"]), f"step {t}: exit decision"
        assert {i for i, c in enumerate(step["candidates"]) if c} == candidates, f"step {t}: candidate set"
        assert {i for i, c in enumerate(step["matched"]) if c} == matched, f"step {t}: matched set"
        assert got == commit, f"step {t}: committed {sorted(got)}, the rule commits {sorted(commit)}"
