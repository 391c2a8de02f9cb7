"""The resumable side-by-side runner: rows appended as they are done, skipped on a rerun,
refused under other settings, a cut last line dropped, Ctrl-C losing only what was in flight."""

import json
import threading

import pytest
from rich.console import Console

from sglang_entropy.tools.commands import without_paths
from sglang_entropy.tools.runner import Rows, SettingsDiffer, rotated, rows_path, run_side_by_side, wall_seconds

SETTINGS = {"task": "mult", "questions": 5, "max_new_tokens": 32, "server_args": ""}
ARMS = ("full", "pruned")


def quiet():
    return Console(file=open("/dev/null", "w"))


def standin(asked: list, interrupt_at: int | None = None):
    """An ask that records what it was asked and answers with the question's number; the
    ``interrupt_at``-th call raises KeyboardInterrupt, as Ctrl-C does in the main thread."""
    lock = threading.Lock()

    def ask(arm, question, group, in_group):
        with lock:
            asked.append((arm, question))
            if interrupt_at is not None and len(asked) == interrupt_at:
                raise KeyboardInterrupt
        return {"tokens": 10 * question + len(arm), "in_group": in_group}

    return ask


def test_a_run_appends_every_record_once_and_a_rerun_asks_nothing(tmp_path):
    rows = Rows(rows_path(tmp_path / "out"), SETTINGS)
    asked = []
    assert run_side_by_side(rows, ARMS, 5, 2, standin(asked), quiet())
    assert sorted(asked) == sorted((a, q) for a in ARMS for q in range(5))
    lines = (tmp_path / "out.rows.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["settings"] == SETTINGS and len(lines) == 1 + 10
    again = []
    assert run_side_by_side(Rows(rows_path(tmp_path / "out"), SETTINGS), ARMS, 5, 2, standin(again), quiet())
    assert again == []
    records = Rows(rows_path(tmp_path / "out"), SETTINGS).by_arm(ARMS)
    assert [r["question"] for r in records["full"]] == list(range(5))
    assert records["pruned"][3]["tokens"] == 36 and records["full"][4]["in_group"] == 1  # the last chunk holds one


def test_an_interrupted_run_keeps_what_was_done_and_the_rerun_finishes_only_the_rest(tmp_path):
    path = rows_path(tmp_path / "out")
    asked = []
    assert not run_side_by_side(Rows(path, SETTINGS), ARMS, 5, 2, standin(asked, interrupt_at=5), quiet())
    before = path.read_text().splitlines()
    done = {(json.loads(line)["arm"], json.loads(line)["question"]) for line in before[1:]}
    assert 1 <= len(done) < 10 and len(done) <= len(asked) - 1  # the interrupted call left no record
    rest = []
    assert run_side_by_side(Rows(path, SETTINGS), ARMS, 5, 2, standin(rest), quiet())
    assert not done & set(rest) and done | set(rest) == {(a, q) for a in ARMS for q in range(5)}
    after = path.read_text().splitlines()
    assert after[: len(before)] == before  # what was written before the interruption is unchanged
    assert len(after) == 1 + 10


def test_other_settings_are_refused_naming_what_differs(tmp_path):
    path = rows_path(tmp_path / "out")
    Rows(path, SETTINGS)
    with pytest.raises(SettingsDiffer, match=r"max_new_tokens: 32 there, 64 now") as raised:
        Rows(path, {**SETTINGS, "max_new_tokens": 64})
    assert "task" not in str(raised.value)
    with pytest.raises(SettingsDiffer, match=r"seed: None there, 1 now"):
        Rows(path, {**SETTINGS, "seed": 1})


def test_a_line_cut_by_an_interruption_is_dropped(tmp_path):
    path = rows_path(tmp_path / "out")
    rows = Rows(path, SETTINGS)
    rows.add({"arm": "full", "question": 0, "batch": "a", "elapsed": 1.0})
    with open(path, "a") as f:
        f.write('{"arm": "full", "question": 1, "ba')
    rows = Rows(path, SETTINGS)
    assert rows.done("full", 0) and not rows.done("full", 1)
    rows.add({"arm": "full", "question": 1, "batch": "a", "elapsed": 2.0})
    assert len(Rows(path, SETTINGS).records) == 2


def test_reports_pair_arms_on_the_questions_all_of_them_have(tmp_path):
    rows = Rows(rows_path(tmp_path / "out"), SETTINGS)
    for arm, question, batch, elapsed in [("full", 0, "a", 3.0), ("full", 1, "a", 5.0), ("pruned", 1, "b", 2.0)]:
        rows.add({"arm": arm, "question": question, "batch": batch, "elapsed": elapsed})
    records = rows.by_arm(("full", "pruned", "never run"))
    assert list(records) == ["full", "pruned"] and [r["question"] for r in records["full"]] == [1]
    assert wall_seconds(rows.by_arm(("full",))["full"]) == 5.0  # a batch lasts as long as its last record


def test_arms_rotate_per_chunk():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"] and rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_recorded_commands_name_paths_by_their_last_part():
    argv = ["tree", "--model-path", "/root/.cache/x/Qwen", "--data=../shared/data/gsm8k_test.jsonl", "--budget", "8"]
    assert without_paths(argv) == ["tree", "--model-path", "<Qwen>", "--data=<gsm8k_test.jsonl>", "--budget", "8"]
    assert without_paths(["taps", "--drafters", "/a/math,/b/chat"]) == ["taps", "--drafters", "<math>,<chat>"]
