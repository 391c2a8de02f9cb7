"""Client side: the sequences of an eager response, each with its full text and answer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable


@dataclass
class Sequence:
    rid: str
    parent: str | None
    branch_token_index: int | None
    token_ids: list[int]  # the whole output, the tokens shared with its ancestors included
    text: str
    answer: str | None


def whole(outputs: list[dict], own: Callable[[dict], list]) -> dict[str, list]:
    """rid -> a per-token list over each sequence's whole output: its ancestors' values before
    each branch point, then ``own(output)`` (its own tokens' values: ids, a signal).
    ``outputs`` is the list ``/generate`` returns for an eager request."""
    by_id = {o["meta_info"]["id"]: o for o in outputs}
    found: dict[str, list] = {}

    def whole_of(rid: str) -> list:
        if rid not in found:
            output = by_id[rid]
            info = output["meta_info"]["entropy"]["sequence"]
            prefix = []
            if info["parent"] is not None:  # the parent's whole values up to the branch point
                parent = whole_of(info["parent"])
                shared = len(parent) - len(own(by_id[info["parent"]]))  # what the parent inherited
                prefix = parent[: shared + info["branch_token_index"]]
            found[rid] = prefix + list(own(output))
        return found[rid]

    return {rid: whole_of(rid) for rid in by_id}


def sequences(outputs: list[dict], tokenizer, extract_answer) -> list[Sequence]:
    """Rebuild every sequence's full output: its parent's tokens before the branch point,
    then its own. ``outputs`` is the list ``/generate`` returns for an eager request."""
    token_ids = whole(outputs, lambda output: output["output_ids"])
    result = []
    for output in outputs:
        rid = output["meta_info"]["id"]
        info = output["meta_info"]["entropy"]["sequence"]
        ids = token_ids[rid]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        result.append(Sequence(rid, info["parent"], info["branch_token_index"], ids, text, extract_answer(text)))
    return result


def majority(answers: list[str | None]) -> str | None:
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None
