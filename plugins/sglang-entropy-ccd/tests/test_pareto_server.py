"""bench ccd-pareto end to end: launched SGLang servers (CPU platform), one per dLLM setting,
on a progression model trained here for a few steps (its answers are wrong; the bench's
counting is what is checked)."""

import dataclasses
import json
from argparse import Namespace

import pytest
from sglang_entropy_ccd.model import LONG_CONFIG, build_model
from sglang_entropy_ccd.pareto import ONE_PER_STEP, run_pareto

pytestmark = pytest.mark.server


def test_the_pareto_bench_runs_every_schedule_on_launched_servers(model_path, tmp_path):
    tiny = build_model(
        tmp_path / "sdar-progression-10steps",
        dataclasses.replace(LONG_CONFIG, steps=10),
        tokenizer_path=model_path,
        eval_problems=2,
    )
    args = Namespace(
        model_path=str(tiny),
        model_steps=None,
        questions=2,
        seed=7,
        block_size=None,
        max_new_tokens=None,
        thresholds=[0.9],
        joint_thresholds=[0.5],
        budgets=[1],
        expand_ratios=[4.0],
        exit_schedule="cosine",
        taus=[(6.0, 2.0)],
        out=str(tmp_path / "pareto"),
    )
    assert run_pareto(args) == 0
    report = json.loads((tmp_path / "pareto.json").read_text())
    assert (tmp_path / "pareto.md").exists() and (tmp_path / "pareto.png").exists()
    assert report["meta"]["block_size"] == LONG_CONFIG.block_size  # taken from the model
    rows = report["rows"]
    labels = [s["arm"] for s in report["summary"]]
    assert len(labels) == 5 and all(sum(r["arm"] == label for r in rows) == 2 for label in labels)
    for row in rows:
        assert row["forwards"] > 0 and 0 < row["tokens"] <= args.max_new_tokens
        if row["arm"] == ONE_PER_STEP:  # one committed position per forward, and a forward to cache each block
            assert row["forwards"] >= row["tokens"]
    assert set(report["targets"]) == {
        "4x_fewer_within_1_point",
        "no_more_forwards_than_lowconfidence_at_its_accuracy",
    }
