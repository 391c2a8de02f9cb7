"""``sglang-entropy bench branch``: full parallel sampling (n = max_sequences) vs EAGer vs
EAGer-adapt, side by side in one run: same server, model and questions.

Full sampling runs every question with ``n`` = M traces. EAGer starts one sequence per
question and forks at high top-K entropy, up to M. EAGer-adapt runs the questions of each
batch as one budget group holding ``adapt_share`` x M sequences per question, which forks
draw from wherever they are needed (each question still capped at M). Reported: pass@k (any
sequence right), majority-vote accuracy, generated tokens and wall time. Records go to
``OUT.rows.jsonl`` as they are done (``sglang_entropy.tools.runner``): the run resumes where it
stopped.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table

from sglang_entropy.tools.commands import bench_command
from sglang_entropy.tools.runner import completeness, open_rows, reportable, run_on_server, wall_seconds
from sglang_entropy_branch.client import majority, sequences

ARMS = ("full sampling", "EAGer", "EAGer-adapt")
SETTINGS = (
    "task", "questions", "first", "seed", "max_sequences", "threshold", "adapt_share", "max_new_tokens", "temperature",
)  # fmt: skip


def ask(url: str, arm: str, text: str, args, group: str, in_group: int) -> list[dict]:
    """One question's outputs in ``arm``; EAGer-adapt's budget is shared by the ``in_group``
    questions asked with the same ``group``."""
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if arm == "full sampling":
        sampling["n"] = args.max_sequences
    else:
        eager = {"threshold": args.threshold, "max_sequences": args.max_sequences}
        if arm == "EAGer-adapt":
            eager.update(budget_group=group, budget=int(args.adapt_share * args.max_sequences * in_group))
        sampling["custom_params"] = {"entropy": {"policy": "eager", "params": eager}}
    response = requests.post(f"{url}/generate", json={"text": text, "sampling_params": sampling}, timeout=3600)
    if response.status_code != 200:
        raise RuntimeError(f"{url}/generate answered {response.status_code}: {response.text[:500]}")
    outputs = response.json()
    return outputs if isinstance(outputs, list) else [outputs]


def run_branch(args) -> int:
    from sglang_entropy_prune.bench import model_and_prompts, questions_for

    console = Console()
    questions = questions_for(args)
    found = model_and_prompts(args, questions, console)
    if found is None:
        return 2
    model_path, tokenizer_path, tokenizer, texts = found
    rows = open_rows("branch", args, SETTINGS, model_path, tokenizer_path, console)
    if rows is None:
        return 2
    settings = rows.settings

    def answerer(url: str):
        def answer(arm: str, question: int, group: str, in_group: int) -> dict:
            return score(questions[question], arm, ask(url, arm, texts[question], args, group, in_group), tokenizer)

        return answer

    complete = run_on_server(rows, ARMS, len(questions), args, model_path, "eager", answerer, console)
    records = reportable(rows, ARMS, console)
    if records is None:
        return 0 if complete else 130
    summary = summarize(records, {arm: wall_seconds(items) for arm, items in records.items()})
    meta = {
        **settings,
        "command": bench_command("branch"),
        "date": datetime.date.today().isoformat(),
        "progress": completeness(records, settings["questions"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=2))
    console.print(summary_table(summary, f"{args.task}: {meta['progress']}, M = {args.max_sequences}"))
    write_report(out, meta, summary)
    console.print(f"results written to {out}.md, .json and .png")
    return 0 if complete else 130


def score(question, arm: str, outputs: list[dict], tokenizer) -> dict:
    """One question's record in one arm: its sequences, tokens, pass@k and majority."""
    from sglang_entropy_prune.voting import extract_answer

    fmt = question.answer_format
    if arm == "full sampling":
        found = [extract_answer(o["text"], fmt) for o in outputs]
    else:
        found = [s.answer for s in sequences(outputs, tokenizer, lambda t, f=fmt: extract_answer(t, f))]
    return {
        "sequences": len(outputs),
        "tokens": sum(o["meta_info"]["completion_tokens"] for o in outputs),
        "pass": question.answer in found,
        "majority": majority(found) == question.answer,
    }


def summarize(scores: dict[str, list[dict]], seconds: dict[str, float]) -> list[dict]:
    base_tokens = sum(r["tokens"] for r in scores["full sampling"])
    questions = len(scores["full sampling"])
    return [
        {
            "arm": arm,
            "sequences": sum(r["sequences"] for r in scores[arm]),
            "tokens": sum(r["tokens"] for r in scores[arm]),
            "token_ratio": sum(r["tokens"] for r in scores[arm]) / base_tokens,
            "pass_at_k": sum(r["pass"] for r in scores[arm]) / questions,
            "majority": sum(r["majority"] for r in scores[arm]) / questions,
            "seconds": seconds[arm],
            "time_ratio": seconds[arm] / seconds["full sampling"],
        }
        for arm in scores
    ]


def summary_table(summary: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("arm", "sequences", "tokens", "vs full", "pass@k", "majority", "wall s", "vs full"):
        table.add_column(column)
    for r in summary:
        table.add_row(
            r["arm"],
            str(r["sequences"]),
            str(r["tokens"]),
            f"{r['token_ratio']:.3f}",
            f"{r['pass_at_k']:.3f}",
            f"{r['majority']:.3f}",
            f"{r['seconds']:.1f}",
            f"{r['time_ratio']:.3f}",
        )
    return table


def write_report(out: Path, meta: dict, summary: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"# Branch-on-entropy vs full sampling: {meta['task']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: {meta['model']['name']}; {meta['progress']}; M = {meta['max_sequences']} sequences per question "
        "(full sampling: n = M; "
        f"EAGer: at most M; EAGer-adapt: at most M, from a pool of {meta['adapt_share']} x M per question shared by "
        f"the {meta['concurrency']} questions of each batch); top-K entropy threshold {meta['threshold']}; "
        f"temperature {meta['temperature']}; at most {meta['max_new_tokens']} new tokens; {meta['date']}.",
        "",
        "pass@k: any sequence of the question is right. Tokens: generated tokens (a child's shared prefix "
        "comes from the parent's KV cache and is not generated again).",
        "",
        "| arm | sequences | tokens | vs full | pass@k | majority | wall s | vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['arm']} | {r['sequences']} | {r['tokens']} | {r['token_ratio']:.3f} | {r['pass_at_k']:.3f} "
            f"| {r['majority']:.3f} | {r['seconds']:.1f} | {r['time_ratio']:.3f} |"
        )
    lines += ["", "Wall times on a CPU are for the ratio only, not a speed claim."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    figure, (tokens_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["arm"] for r in summary]
    tokens_axis.bar(names, [r["token_ratio"] for r in summary], color=["gray", "tab:blue", "tab:green"])
    tokens_axis.set_ylabel("generated tokens (full sampling = 1)")
    for offset, key in enumerate(("pass_at_k", "majority")):
        accuracy_axis.bar(
            [i + (offset - 0.5) * 0.35 for i in range(len(names))], [r[key] for r in summary], 0.35, label=key
        )
    accuracy_axis.set_xticks(range(len(names)), names)
    accuracy_axis.set_ylim(0, 1.25)
    accuracy_axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    accuracy_axis.set_ylabel("accuracy")
    accuracy_axis.legend(loc="upper center", ncol=2)
    figure.suptitle(f"{meta['task']}: {meta['progress']}, M = {meta['max_sequences']}")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
