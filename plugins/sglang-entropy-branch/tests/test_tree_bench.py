"""``bench tree``'s arithmetic on made-up responses: whole sequences, scores, intervals, targets."""

import numpy as np
import pytest
from sglang_entropy_branch import tree_bench
from sglang_entropy_prune.bench import GROUNDS, Question


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def output(rid, parent, branch, text, confidences, stopped=False):
    finish = {"type": "stop", "entropy_policy": "deepconf" if stopped else None}
    return {
        "text": text,
        "output_ids": [ord(c) for c in text],
        "meta_info": {
            "id": rid,
            "completion_tokens": len(text),
            "finish_reason": finish,
            "entropy": {
                "signals": {"confidence": confidences},
                "sequence": {"id": rid, "parent": parent, "branch_token_index": branch},
            },
        },
    }


def test_tree_sequences_are_rebuilt_whole():
    outputs = [
        output("r", None, None, "4 2", [1.0, 2.0, 3.0]),
        output("r-b1", "r", 1, "5", [4.0]),  # "4" then its own "5"
        output("r-b2", "r-b1", 1, "x", [5.0], stopped=True),  # "4", "5", then "x"
    ]
    answered = tree_bench.tree(outputs, CharTokenizer())
    assert [a.text for a in answered] == ["4 2", "45", "45x"]
    assert [a.confidences for a in answered] == [[1.0, 2.0, 3.0], [1.0, 4.0], [1.0, 4.0, 5.0]]
    assert [a.pruned for a in answered] == [False, False, True]
    record = tree_bench.score(Question("", "45", "number"), answered, generated=5, window=2)
    assert record == {
        "tokens": 5,
        "sequences": 3,
        "pruned": 1,
        "majority": False,  # "4 2" reads as 2, "45" as 45: a tie, the first wins
        "weighted": True,  # 45's trace is the more confident one
        "pass_at_k": True,
        "trace_accuracy": 0.5,
    }


def records(tokens, right):
    return [
        {"tokens": t, "sequences": 8, "pruned": 0, **dict.fromkeys(tree_bench.METRICS, r)}
        for t, r in zip(tokens, right, strict=True)
    ]


def test_summary_intervals_and_targets():
    full = records([100] * 40, [True] * 20 + [False] * 20)
    cheap = records([30] * 40, [True] * 20 + [False] * 20)  # 70% fewer tokens, same answers
    bad = records([30] * 40, [False] * 40)
    table = {arm: cheap for arm in tree_bench.ARMS}
    table["full sampling"] = full
    summary = tree_bench.summarize(table, dict.fromkeys(tree_bench.ARMS, 1.0), seed=0)
    by = {r["arm"]: r for r in summary}
    assert by["DeepConf-low"]["token_ratio"] == pytest.approx(0.3)
    assert by["DeepConf-low"]["token_ratio_ci"] == pytest.approx((0.3, 0.3))
    low, high = by["full sampling"]["majority_ci"]
    assert low < 0.5 < high
    assert by["DeepConf-low"]["majority_vs_full_ci"] == (0.0, 0.0)
    met = tree_bench.targets(summary)
    assert all(result["met"] for result in met.values())
    table["DeepConf-low"] = table["tree + DeepConf"] = table["tree + DeepConf, budget"] = bad
    met = tree_bench.targets(tree_bench.summarize(table, dict.fromkeys(tree_bench.ARMS, 1.0), seed=0))
    first, _, third = met.values()
    assert not first["met"] and not third["met"]


def test_grounds_are_seeded_and_right():
    for task, questions in GROUNDS.items():
        first, again = questions(100, 3), questions(100, 3)
        assert first == again and len(first) == 100, task
    for q in GROUNDS["mult"](50, 1):
        a, b = (int(w) for w in q.prompt.removeprefix("What is ").split("?")[0].split(" times "))
        assert int(q.answer) == a * b and 2 <= a <= 9
    assert np.mean([int(q.answer) for q in GROUNDS["add2"](200, 0)]) > 50


@pytest.mark.server
def test_the_bench_runs_every_arm_against_a_server(entropy_server, model_path, tmp_path):
    import json
    from argparse import Namespace

    args = Namespace(
        url=entropy_server.url,
        model_path=None,
        tokenizer=str(model_path),
        task="mult",
        data=None,
        questions=2,
        seed=1,
        budget=3,
        warmup=1,
        window=4,
        eager_threshold=1.0,
        adapt_share=0.5,
        max_new_tokens=12,
        temperature=0.7,
        concurrency=2,
        out=str(tmp_path / "tree"),
    )
    assert tree_bench.run_tree(args) == 0
    results = json.loads((tmp_path / "tree.json").read_text())
    assert [row["arm"] for row in results["summary"]] == list(tree_bench.ARMS)
    for arm, records in results["records"].items():
        assert len(records) == 2 and all(r["tokens"] > 0 and 1 <= r["sequences"] <= 3 for r in records), arm
    assert len(results["targets"]) == 3 and (tmp_path / "tree.md").exists() and (tmp_path / "tree.png").exists()
