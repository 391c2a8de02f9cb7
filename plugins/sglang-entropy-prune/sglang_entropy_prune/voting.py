"""Answers and votes over a question's traces (DeepConf, Fu et al. 2025).

Used by the server (consensus stop, the group's vote in the response) and by clients
(``vote(traces_from_outputs(outputs))``). Plain Python: it runs once per trace, not per token.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

AnswerFormat = Literal["auto", "gsm8k", "boxed", "number"]
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


@dataclass
class Trace:
    """One sampled answer to a question, as the vote sees it."""

    text: str
    confidences: Sequence[float]  # per-token DeepConf confidence, as returned by the server
    stopped_early: bool = False  # stopped by a pruning policy: it does not vote


@dataclass
class VoteResult:
    majority: str | None  # most frequent answer
    weighted: str | None  # answer with the largest sum of trace confidences
    filtered: str | None  # weighted vote over the top-eta% most confident traces
    weighted_support: float  # the weighted winner's share of the weighted vote
    voters: int  # traces that voted (finished, not stopped early, with an answer)
    tallies: dict[str, float] = field(default_factory=dict)  # answer -> summed confidence


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$7' -> '7', '-3.0' -> '-3'."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_answer(text: str, answer_format: AnswerFormat = "auto") -> str | None:
    """The final answer of a trace: GSM8K's ``#### 42``, LaTeX ``\\boxed{42}``, or the last
    number (after the last '=' when there is one, since small models restate the question)."""
    if answer_format in ("auto", "gsm8k"):
        match = re.search(r"####\s*(" + _NUMBER + ")", text)
        if match:
            return normalize_number(match.group(1))
        if answer_format == "gsm8k":
            return None
    if answer_format in ("auto", "boxed"):
        boxed = _last_boxed(text)
        if boxed is not None:
            return normalize_number(boxed) or boxed
        if answer_format == "boxed":
            return None
    tail = text[text.rfind("=") + 1 :] if "=" in text else text
    numbers = re.findall(_NUMBER, tail) or re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def lowest_group_confidence(confidences: Sequence[float], window: int) -> float:
    """Minimum over the trace's full sliding windows of the mean token confidence; the mean
    of all tokens when the trace is shorter than one window (as DeepConf's own code does)."""
    values = [c for c in confidences if c is not None]
    if not values:
        return math.nan
    if len(values) < window:
        return sum(values) / len(values)
    running = sum(values[:window])
    lowest = running
    for i in range(window, len(values)):
        running += values[i] - values[i - window]
        lowest = min(lowest, running)
    return lowest / window


def calibrated_threshold(lowest_confidences: Iterable[float], percentile: float) -> float:
    """DeepConf's online threshold: the ``percentile`` of the warm-up traces' lowest group
    confidences (90: DeepConf-low keeps the top 10%; 10: DeepConf-high keeps the top 90%),
    with linear interpolation between order statistics (NumPy's default)."""
    values = sorted(v for v in lowest_confidences if not math.isnan(v))
    if not values:
        raise ValueError("no warm-up trace has a confidence to calibrate from")
    rank = (len(values) - 1) * percentile / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def vote(
    traces: Sequence[Trace], answer_format: AnswerFormat = "auto", window: int = 2048, eta: float = 10
) -> VoteResult:
    """Majority, confidence-weighted and top-``eta``% filtered votes. A trace's weight is its
    lowest group confidence over ``window`` tokens; early-stopped traces do not vote."""
    ballots = []
    for trace in traces:
        answer = None if trace.stopped_early else extract_answer(trace.text, answer_format)
        if answer is not None:
            ballots.append((answer, lowest_group_confidence(trace.confidences, window)))
    return ballot_vote(ballots, eta)


def ballot_vote(ballots: Sequence[tuple[str, float]], eta: float = 10) -> VoteResult:
    """``vote`` over (answer, weight) ballots that are already read: majority, weighted, and
    weighted over the top-``eta``% by weight (DeepConf offline keeps 10% or 90%)."""
    if not ballots:
        return VoteResult(None, None, None, 0.0, 0)
    counts: dict[str, int] = defaultdict(int)
    tallies: dict[str, float] = defaultdict(float)
    for answer, weight in ballots:
        counts[answer] += 1
        tallies[answer] += 0.0 if math.isnan(weight) else weight
    kept = sorted(ballots, key=lambda b: b[1], reverse=True)[: max(1, math.ceil(len(ballots) * eta / 100))]
    filtered: dict[str, float] = defaultdict(float)
    for answer, weight in kept:
        filtered[answer] += weight
    weighted = max(tallies, key=tallies.get)
    total = sum(tallies.values())
    return VoteResult(
        majority=max(counts, key=counts.get),
        weighted=weighted,
        filtered=max(filtered, key=filtered.get),
        weighted_support=tallies[weighted] / total if total > 0 else 0.0,
        voters=len(ballots),
        tallies=dict(tallies),
    )


def traces_from_outputs(outputs: Sequence[dict]) -> list[Trace]:
    """Traces from the server's answer to one question: the list a native ``/generate`` with
    ``n`` returns (each with ``return_signals: ["confidence"]`` or a deepconf group)."""
    traces = []
    for output in outputs:
        meta = output["meta_info"]
        entropy = meta.get("entropy") or {}
        finish = meta.get("finish_reason") or {}
        if finish.get("type") == "abort":
            continue
        traces.append(
            Trace(
                text=output["text"],
                confidences=entropy.get("signals", {}).get("confidence", []),
                stopped_early=bool(finish.get("entropy_policy")),
            )
        )
    return traces
