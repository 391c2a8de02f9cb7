"""End to end: the demo's side-by-side runs every installed policy's demo arm next to full
sampling on the launched server, and draws it into the demo's plot."""

import pytest
from rich.console import Console

from sglang_entropy.tools import cli, demo

pytestmark = pytest.mark.server


def test_the_demo_compares_each_installed_policy_with_full_sampling(entropy_server, tokenizer, tmp_path):
    args = cli.build_parser().parse_args(["demo"])
    assert [(arm.name, arm.policy) for arm in args.demo_arms] == [("DeepConf-low", "deepconf"), ("EAGer tree", "eager")]
    questions = demo.arithmetic_questions(2)
    rows = demo.side_by_side(entropy_server.url, tokenizer, args.demo_arms, questions, 4, Console())
    assert [row["arm"] for row in rows] == ["full sampling", "DeepConf-low", "EAGer tree"]
    full = rows[0]["tokens"]
    for row in rows:
        assert row["tokens"] > 0 and row["vs_full"] == pytest.approx(row["tokens"] / full)
        assert row["accuracy"] in (0.0, 0.5, 1.0)
    # full sampling generates every one of its 4 x 2 traces; the policies at most as many sequences
    assert full >= 2 * 4
    plot = tmp_path / "demo.png"
    demo.plot([], [], str(plot), rows, "title")
    assert plot.stat().st_size > 10_000


def test_majority_reads_the_last_number_of_each_text():
    assert demo.majority(["it is 7", "7", "3 + 4 = 8", "no idea"]) == "7"
    assert demo.majority(["no idea"]) is None
