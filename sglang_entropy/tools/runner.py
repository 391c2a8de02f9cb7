"""Side-by-side benchmark runs that survive interruption (``bench prune``, ``branch``, ``tree``).

Every finished (arm, question) record is appended to ``OUT.rows.jsonl`` as soon as it is done.
The file's first line holds the settings that produced the records; the same command run again
skips what is done and continues, and a run with other settings is refused, naming what
differs. Reports are rebuilt from the rows at any point, so partial rows can be committed and
the run finished later. Ctrl-C loses at most the questions in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence

ROWS_FORMAT = 1


class SettingsDiffer(Exception):
    """The rows file was written with other settings than this run's."""


def rows_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".rows.jsonl")


def _normalized(settings: dict) -> dict:
    return json.loads(json.dumps(settings))  # tuples become lists, as they read back


class Rows:
    """The append-only record file of one run: (arm, question) -> record."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, _normalized(settings)
        self.records: dict[tuple[str, int], dict] = {}
        if path.exists() and path.stat().st_size:
            self._load()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"format": ROWS_FORMAT, "settings": self.settings}) + "\n")

    def _load(self) -> None:
        text = self.path.read_text()
        if not text.endswith("\n"):  # a line cut by an interruption: drop it, so appends stay whole lines
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text)
        header, *lines = text.splitlines()
        recorded = json.loads(header)["settings"]
        differ = [k for k in sorted(set(recorded) | set(self.settings)) if recorded.get(k) != self.settings.get(k)]
        if differ:
            said = "; ".join(f"{k}: {recorded.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ)
            raise SettingsDiffer(
                f"{self.path} was written with other settings ({said}). Run with its settings to continue "
                "it, or give another --out."
            )
        for line in lines:
            record = json.loads(line)
            self.records[(record["arm"], record["question"])] = record

    def done(self, arm: str, question: int) -> bool:
        return (arm, question) in self.records

    def add(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[(record["arm"], record["question"])] = record

    def by_arm(self, arms: Sequence[str]) -> dict[str, list[dict]]:
        """Each arm's records, by question, for the questions every arm of ``arms`` has done
        (so every comparison is paired); arms with no record are left out."""
        present = [a for a in arms if any(arm == a for arm, _ in self.records)]
        common = set.intersection(*({q for arm, q in self.records if arm == a} for a in present)) if present else set()
        return {a: [self.records[(a, q)] for q in sorted(common)] for a in present}


def rotated(arms: Sequence[str], turn: int) -> list[str]:
    """The arms' order for the ``turn``-th chunk: rotating, so drift of the machine hits every arm alike."""
    shift = turn % len(arms)
    return list(arms[shift:]) + list(arms[:shift])


Ask = Callable[[str, int, str, int], dict]  # (arm, question, group, questions in the group) -> record


def run_side_by_side(rows: Rows, arms: Sequence[str], questions: int, concurrency: int, ask: Ask, console) -> bool:
    """Every arm on every question not yet in ``rows``, ``concurrency`` questions at a time,
    each arm's questions of a chunk at once (one ``group`` name, for budgets shared by the
    chunk), the arms' order rotating per chunk. Each record is appended when it is done, with
    ``batch`` and ``elapsed`` (seconds since its batch began) for the wall-time ratios. Returns
    False when interrupted (Ctrl-C): the questions in flight are lost, nothing else."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    total = len(arms) * questions
    done = sum(rows.done(a, q) for a in arms for q in range(questions))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("ETA"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("(arm, question) records", total=total, completed=done)
        for turn, start in enumerate(range(0, questions, concurrency)):
            chunk = range(start, min(start + concurrency, questions))
            for arm in rotated(arms, turn):
                todo = [q for q in chunk if not rows.done(arm, q)]
                if not todo:
                    continue
                if not _run_batch(rows, arm, todo, ask, lambda: progress.advance(task)):
                    return False
    return True


def _run_batch(rows: Rows, arm: str, todo: list[int], ask: Ask, advance) -> bool:
    group, begin = uuid.uuid4().hex, time.perf_counter()
    pool = ThreadPoolExecutor(len(todo))
    pending = {pool.submit(ask, arm, q, group, len(todo)): q for q in todo}
    try:
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                question = pending.pop(future)
                record = future.result()
                elapsed = time.perf_counter() - begin
                rows.add({"arm": arm, "question": question, "batch": group, "elapsed": elapsed, **record})
                advance()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        return False
    pool.shutdown()
    return True


def wall_seconds(records: list[dict]) -> float:
    """An arm's wall time: each batch took as long as its last record."""
    batches: dict[str, float] = {}
    for r in records:
        batches[r["batch"]] = max(batches.get(r["batch"], 0.0), r["elapsed"])
    return sum(batches.values())


def completeness(records: dict[str, list[dict]], questions: int) -> str:
    done = len(next(iter(records.values()), []))
    return f"{done} of {questions} questions" + ("" if done == questions else " (incomplete: the run goes on)")


def bench_settings(bench: str, args, keys: Sequence[str], model_path, tokenizer_path) -> dict:
    """What a run's records depend on: the bench's own ``keys`` of ``args``, the common ones,
    and the model and data by name and sha256 (never a local path)."""
    from sglang_entropy.tools.model import data_card, model_card

    return {
        "bench": bench,
        **{k: getattr(args, k) for k in (*keys, "concurrency", "server_args")},
        "data": data_card(Path(args.data)) if args.data else None,
        "model": model_card(Path(model_path)) if model_path else {"name": Path(tokenizer_path).name},
    }


def open_rows(bench: str, args, keys: Sequence[str], model_path, tokenizer_path, console) -> Rows | None:
    """The run's rows under ``bench_settings``; None, after saying why, when the rows file was
    written with other settings."""
    try:
        return Rows(rows_path(args.out), bench_settings(bench, args, keys, model_path, tokenizer_path))
    except SettingsDiffer as e:
        console.print(str(e))
        return None


def run_on_server(rows: Rows, arms: Sequence[str], questions: int, args, model_path, policies: str, answerer, console):
    """Unless ``--report-only``: reach ``--url`` or launch a server with ``policies`` enabled and
    ``--server-args``, and ``run_side_by_side`` with ``answerer(url)`` as the ask. Returns False
    when interrupted."""
    import shlex

    from sglang_entropy.tools import server as sglang_server

    if args.report_only:
        return True
    flags = ["--entropy-policies", policies, *shlex.split(args.server_args)]
    with sglang_server.server_url(args.url, model_path, flags, progress=console.print) as url:
        return run_side_by_side(rows, arms, questions, args.concurrency, answerer(url), console)


def reportable(rows: Rows, arms: Sequence[str], console) -> dict[str, list[dict]] | None:
    """``rows.by_arm(arms)``; None, after saying so, while no question has full sampling and every other arm."""
    records = rows.by_arm(arms)
    if "full sampling" not in records:
        console.print(f"no question has every arm recorded yet in {rows.path}: nothing to report")
        return None
    return records


def add_common_flags(
    parser: argparse.ArgumentParser,
    *,
    tasks: Sequence[str],
    questions: int,
    out: str,
    temperature: float = 0.7,
    concurrency: int = 4,
) -> None:
    """The flags every side-by-side bench shares: where the server and model are, which
    questions, sampling, concurrency, and where results go."""
    parser.add_argument("--url", help="a running server with the bench's policies enabled; default: launch one")
    parser.add_argument("--model-path", help="model to launch (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tokenizer", help="with --url: the model's tokenizer (a folder or hub id)")
    parser.add_argument("--task", choices=tasks, default=tasks[0])
    parser.add_argument("--data", help="--task gsm8k: a GSM8K-shaped JSONL, read in place")
    parser.add_argument("--questions", type=int, default=questions)
    parser.add_argument(
        "--first",
        type=int,
        help="--task gsm8k: take the file's questions from this index on, in order (default: a seeded sample)",
    )
    parser.add_argument("--seed", type=int, default=0, help="which questions (and the bootstrap's seed)")
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--concurrency", type=int, default=concurrency, help="questions at a time")
    parser.add_argument(
        "--server-args", default="", help="more SGLang launch flags for the launched server, e.g. '--dtype float32'"
    )
    parser.add_argument(
        "--out", default=out, help="path prefix of the results (.md, .json, .png) and of the resumable .rows.jsonl"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the rows file without running anything"
    )
