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
    traces = record.pop("traces")
    assert record == {
        "truth": "45",
        "tokens": 5,
        "sequences": 3,
        "pruned": 1,
        "majority": False,  # "4 2" reads as 2, "45" as 45: a tie, the first wins
        "weighted": True,  # 45's trace is the more confident one
        "pass_at_k": True,
        "trace_accuracy": 0.5,
    }
    assert [(t["answer"], t["right"], t["tokens"], t["pruned"]) for t in traces] == [
        ("2", False, 3, False),
        ("45", True, 1, False),
        ("45", True, 1, True),  # right, but pruned: it counts for pass@k only
    ]
    assert [t["lowest"] for t in traces] == [1.5, 2.5, 2.5] and traces[0]["mean"] == 2.0


def test_deepconf_offline_votes_with_the_most_confident_traces():
    def trace(answer, lowest):
        return {"answer": answer, "right": answer == "7", "lowest": lowest, "tokens": 10, "pruned": False}

    # Six traces say 3 with low confidence, four say 7 with high: majority 3, top 10% and 90% pick 7.
    traces = [trace("3", 1.0)] * 6 + [trace("7", 5.0)] * 4
    record = {
        "question": 0,
        "truth": "7",
        "batch": "b",
        "elapsed": 1.0,
        "tokens": 100,
        "sequences": 10,
        "traces": traces,
    }
    top10, top90 = tree_bench.offline(record, 10), tree_bench.offline(record, 90)
    assert top10["majority"] and top10["trace_accuracy"] == 1.0 and top10["tokens"] == 100
    assert top90["majority"]  # 9 kept: 4 x 5.0 for 7 beats 5 x 1.0 for 3
    assert top90["trace_accuracy"] == pytest.approx(4 / 9)
    wrong = {**record, "traces": [trace("3", 7.5)] + [trace("7", 1.0)] * 9}  # top 90%: 7.5 against 8 x 1.0
    assert not tree_bench.offline(wrong, 10)["majority"] and tree_bench.offline(wrong, 90)["majority"]


def test_the_signal_report():
    right, wrong = (
        {"right": True, "finish": "stop", "pruned": False},
        {"right": False, "finish": "length", "pruned": False},
    )
    traces = [{**right, "mean": 3.0, "lowest": 2.0, "tokens": 5}, {**wrong, "mean": 1.0, "lowest": 2.0, "tokens": 9}]
    stopped = [{**wrong, "mean": 1.0, "lowest": 0.5, "tokens": 4, "pruned": True}]
    found = tree_bench.signal({"full sampling": [{"traces": traces}], "DeepConf-low": [{"traces": stopped}]})
    assert found["auroc_mean"] == 1.0 and found["auroc_lowest"] == 0.5  # a tie counts half
    assert (found["traces"], found["right"], found["finished"]) == (2, 1, 1)
    assert found["stops"] == {"DeepConf-low": [4]}


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
    assert tree_bench.targets(tree_bench.summarize({"full sampling": full}, {"full sampling": 1.0}, seed=0)) == {
        name: {"met": None} for name in tree_bench.targets(tree_bench.summarize(table, dict.fromkeys(table, 1.0), 0))
    }  # targets whose arms did not run are "not run"
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
def test_the_bench_resumes_after_an_interruption_on_the_real_server(entropy_server, model_path, tmp_path, monkeypatch):
    """Every arm on 4 questions, interrupted (Ctrl-C) during the run, then the same command
    again: every (arm, question) recorded exactly once, what was written before unchanged, and
    the report counts all; other settings are refused."""
    import json
    import threading

    from sglang_entropy.tools.cli import build_parser

    out = tmp_path / "tree"
    argv = ["bench", "tree", "--url", entropy_server.url, "--tokenizer", str(model_path), "--task", "mult"]
    argv += ["--questions", "4", "--seed", "1", "--budget", "3", "--warmup", "1", "--window", "4"]
    argv += ["--eager-threshold", "1.0", "--max-new-tokens", "12", "--concurrency", "2", "--out", str(out)]
    posted, lock, real_post = [], threading.Lock(), tree_bench.post

    def interrupted_post(*args, **kwargs):
        with lock:
            posted.append(1)
            if len(posted) == 9:
                raise KeyboardInterrupt
        return real_post(*args, **kwargs)

    monkeypatch.setattr(tree_bench, "post", interrupted_post)
    args = build_parser().parse_args(argv)
    assert args.func(args) == 130
    rows = out.with_name("tree.rows.jsonl")
    before = rows.read_text().splitlines()
    assert 1 <= len(before) - 1 < 4 * len(tree_bench.ARMS)
    monkeypatch.setattr(tree_bench, "post", real_post)
    assert args.func(args) == 0
    after = rows.read_text().splitlines()
    assert after[: len(before)] == before
    pairs = [(json.loads(line)["arm"], json.loads(line)["question"]) for line in after[1:]]
    assert sorted(pairs) == sorted((arm, q) for arm in tree_bench.ARMS for q in range(4))
    results = json.loads(out.with_suffix(".json").read_text())
    assert [row["arm"] for row in results["summary"]] == [
        "full sampling",
        *tree_bench.OFFLINE,
        *tree_bench.ARMS[1:],
    ]
    for arm, records in results["records"].items():
        assert [r["question"] for r in records] == [0, 1, 2, 3], arm
        assert all(r["tokens"] > 0 and 1 <= r["sequences"] <= 3 for r in records), arm
    assert results["meta"]["progress"] == "4 of 4 questions"
    assert "4 of 4 questions" in out.with_suffix(".md").read_text() and out.with_suffix(".png").exists()
    other = build_parser().parse_args([a if a != "12" else "16" for a in argv])
    assert other.func(other) == 2  # refused: max_new_tokens differs
    assert rows.read_text().splitlines() == after
