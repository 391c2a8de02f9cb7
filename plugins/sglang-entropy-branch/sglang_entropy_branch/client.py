"""Client side: the sequences of an eager response, each with its full text and answer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass
class Sequence:
    rid: str
    parent: str | None
    branch_token_index: int | None
    token_ids: list[int]  # the whole output, the tokens shared with its ancestors included
    text: str
    answer: str | None


def sequences(outputs: list[dict], tokenizer, extract_answer) -> list[Sequence]:
    """Rebuild every sequence's full output: its parent's tokens before the branch point,
    then its own. ``outputs`` is the list ``/generate`` returns for an eager request."""
    by_id = {o["meta_info"]["id"]: o for o in outputs}
    prefix: dict[str, list[int]] = {}  # tokens a sequence shares with its ancestors

    def prefix_of(rid: str) -> list[int]:
        if rid not in prefix:
            info = by_id[rid]["meta_info"]["entropy"]["sequence"]
            if info["parent"] is None:
                prefix[rid] = []
            else:  # the parent's tokens before the branch point (an index into the parent's own output)
                parent = prefix_of(info["parent"]) + list(by_id[info["parent"]]["output_ids"])
                prefix[rid] = parent[: len(prefix_of(info["parent"])) + info["branch_token_index"]]
        return prefix[rid]

    result = []
    for output in outputs:
        rid = output["meta_info"]["id"]
        info = output["meta_info"]["entropy"]["sequence"]
        ids = prefix_of(rid) + list(output["output_ids"])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        result.append(Sequence(rid, info["parent"], info["branch_token_index"], ids, text, extract_answer(text)))
    return result


def majority(answers: list[str | None]) -> str | None:
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None
