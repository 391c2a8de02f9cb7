"""``sglang-entropy bench taps``: the summary's arithmetic on hand-made rows, and its arms' launch flags."""

import json
from argparse import Namespace
from pathlib import Path

import pytest
from sglang_entropy_specroute import bench


def row(prompt, domain, arm, tokens, steps, seconds, routes=(), output=None):
    return {
        "prompt": prompt,
        "domain": domain,
        "arm": arm,
        "output_ids": output or [prompt] * tokens,
        "tokens": tokens,
        "verify_steps": steps,
        "seconds": seconds,
        "routes": list(routes),
        "routes_to_most_confident": True,
    }


def test_summary_per_domain_and_mixed():
    alone = bench.TARGET_ALONE
    rows = [
        row(0, "math", alone, 9, 0, 3.0),
        row(0, "math", "math drafter alone", 9, 2, 1.0),
        row(0, "math", bench.ROUTING, 9, 4, 2.0, ["math", "math", "math", "chat"]),
        row(1, "chat", alone, 11, 0, 2.0),
        row(1, "chat", "math drafter alone", 11, 10, 4.0),
        row(1, "chat", bench.ROUTING, 11, 5, 1.0, ["chat"] * 5),
    ]
    summary = {
        (s["arm"], s["domain"]): s
        for s in bench.summarize(rows, [alone, "math drafter alone", bench.ROUTING], ["math", "chat"])
    }
    # (tokens - 1) / verify steps: the first token comes from the prefill
    assert summary[("math drafter alone", "math")]["acceptance_length"] == pytest.approx(8 / 2)
    assert summary[("math drafter alone", "chat")]["acceptance_length"] == pytest.approx(10 / 10)
    assert summary[("math drafter alone", "mixed")]["acceptance_length"] == pytest.approx(18 / 12)
    assert summary[(bench.ROUTING, "mixed")]["acceptance_length"] == pytest.approx(18 / 9)
    assert summary[(alone, "math")]["acceptance_length"] is None
    # tokens/s as a ratio to the target alone on the same prompts
    assert summary[(bench.ROUTING, "math")]["tokens_per_s_vs_target"] == pytest.approx((9 / 2.0) / (9 / 3.0))
    assert summary[(bench.ROUTING, "mixed")]["tokens_per_s_vs_target"] == pytest.approx((20 / 3.0) / (20 / 5.0))
    assert summary[(bench.ROUTING, "math")]["route_share"] == {"math": 0.75, "chat": 0.25}
    assert summary[(bench.ROUTING, "mixed")]["route_share"] == pytest.approx({"math": 3 / 9, "chat": 6 / 9})
    assert summary[("math drafter alone", "math")]["route_share"] is None


def test_identical_outputs_compare_with_the_target_alone():
    rows = [
        row(0, "math", bench.TARGET_ALONE, 3, 0, 1.0, output=[1, 2, 3]),
        row(0, "math", bench.ROUTING, 3, 1, 1.0, output=[1, 2, 3]),
        row(1, "chat", bench.TARGET_ALONE, 3, 0, 1.0, output=[4, 5, 6]),
        row(1, "chat", bench.ROUTING, 3, 1, 1.0, output=[4, 5, 7]),
    ]
    assert bench.identical_outputs(rows) == {bench.TARGET_ALONE: 1.0, bench.ROUTING: 0.5}


def test_arms_share_the_speculative_settings():
    args = Namespace(dtype="float32", num_steps=3)
    drafters = [Path("/d/math"), Path("/d/chat")]
    arms = dict(bench.arms(args, drafters))
    assert list(arms) == [bench.TARGET_ALONE, "math drafter alone", "chat drafter alone", bench.ROUTING]
    assert "--speculative-algorithm" not in arms[bench.TARGET_ALONE]
    routing = arms[bench.ROUTING]
    assert routing[routing.index("--speculative-draft-model-path") + 1] == "/d/math"  # drafter 0 is SGLang's own
    assert routing[routing.index("--entropy-drafters") + 1] == "/d/math,/d/chat"
    for label in ("math drafter alone", "chat drafter alone", bench.ROUTING):
        flags = arms[label]
        assert flags[flags.index("--speculative-num-draft-tokens") + 1] == "4"


def test_missing_drafters_name_the_build_command(tmp_path):
    with pytest.raises(SystemExit, match="sglang-entropy-drafters"):
        bench.drafter_paths(Namespace(drafters=f"{tmp_path}/a,{tmp_path}/b"))


def test_report_writes_markdown_json_and_plot(tmp_path):
    labels = [bench.TARGET_ALONE, "math drafter alone", bench.ROUTING]
    rows = [
        row(0, "math", bench.TARGET_ALONE, 9, 0, 3.0),
        row(0, "math", "math drafter alone", 9, 2, 1.0),
        row(0, "math", bench.ROUTING, 9, 4, 2.0, ["math"] * 4),
        row(1, "chat", bench.TARGET_ALONE, 11, 0, 2.0),
        row(1, "chat", "math drafter alone", 11, 10, 4.0),
        row(1, "chat", bench.ROUTING, 11, 5, 1.0, ["chat"] * 5),
    ]
    summary = bench.summarize(rows, labels, ["math", "chat"])
    meta = {
        "command": "sglang-entropy bench taps --prompts 1",
        "target": {"name": "t", "sha256": "ab" * 32},
        "drafters": [{"name": "math", "sha256": "cd" * 32}, {"name": "chat", "sha256": None}],
        "prompts_per_domain": 1,
        "max_new_tokens": 16,
        "greedy_outputs_identical_to_target": bench.identical_outputs(rows),
    }
    out = tmp_path / "taps"
    bench.write_report(out, meta, summary, rows)
    text = out.with_suffix(".md").read_text()
    assert "`sglang-entropy bench taps --prompts 1`" in text
    assert "Target t (sha256 abababababababab...); drafters math (sha256 cdcdcdcdcdcdcdcd...), chat (sha256 not" in text
    assert "| mixed | taps routing | 2.00 | 1.67x | math 44%, chat 56% |" in text
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == len(rows)
