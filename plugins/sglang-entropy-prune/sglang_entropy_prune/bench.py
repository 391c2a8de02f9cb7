"""``sglang-entropy bench prune``: full parallel sampling with voting vs DeepConf online
(low and high), side by side in one run: same server and model, same questions, the same
budget of traces per question.

Each question is one request with ``n`` = budget: the full arm returns every trace's
confidences and votes over all of them; the DeepConf arms run the policy's group (warm-up
traces in full, the rest pruned online at the calibrated threshold) and vote over the traces
that were not stopped. Questions run a few at a time; within each batch of questions every
arm runs back to back, in rotating order, so the machine's drift hits every arm alike.
Records go to ``OUT.rows.jsonl`` as they are done (``sglang_entropy.tools.runner``): the run
resumes where it stopped.
"""

from __future__ import annotations

import datetime
import json
import random
from dataclasses import dataclass
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table

from sglang_entropy.tools.commands import bench_command
from sglang_entropy.tools.model import card_text
from sglang_entropy.tools.runner import completeness, open_rows, reportable, run_on_server, wall_seconds
from sglang_entropy_prune.voting import extract_answer, normalize_number, traces_from_outputs, vote

SYSTEM_PROMPTS = {
    "arith": "What is {a} + {b}? Answer with just the number.",
    "mult": "What is {a} times {b}? Answer with just the number.",
    "gsm8k": "{question}\nSolve it step by step, then write the final answer as '#### <number>'.",
}


@dataclass(frozen=True)
class Question:
    prompt: str  # the user message
    answer: str
    answer_format: str


def arithmetic_questions(count: int, seed: int) -> list[Question]:
    """One-digit addition: a task where SmolLM2-135M-Instruct is right 20-80% of the time."""
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(count)]
    return [Question(SYSTEM_PROMPTS["arith"].format(a=a, b=b), str(a + b), "number") for a, b in pairs]


def multiplication_questions(count: int, seed: int) -> list[Question]:
    """One-digit multiplication (2 to 9): SmolLM2-135M-Instruct gets about a quarter of the
    traces right, so votes and trees have room to help."""
    rng = random.Random(seed)
    pairs = [(rng.randint(2, 9), rng.randint(2, 9)) for _ in range(count)]
    return [Question(SYSTEM_PROMPTS["mult"].format(a=a, b=b), str(a * b), "number") for a, b in pairs]


def two_digit_addition_questions(count: int, seed: int) -> list[Question]:
    """Two-digit addition (10 to 99): harder still for the default model."""
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(count)]
    return [Question(SYSTEM_PROMPTS["arith"].format(a=a, b=b), str(a + b), "number") for a, b in pairs]


GROUNDS = {"arith": arithmetic_questions, "mult": multiplication_questions, "add2": two_digit_addition_questions}


def gsm8k_questions(path: Path, count: int, seed: int, first: int | None = None) -> list[Question]:
    """GSM8K-shaped JSONL (``question``, ``answer`` ending in ``#### <number>``), read in place:
    ``count`` questions from index ``first`` on in the file's order, or a sample seeded by ``seed``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if first is None:
        rows = random.Random(seed).sample(rows, min(count, len(rows)))
    else:
        rows = rows[first : first + count]
    return [
        Question(
            SYSTEM_PROMPTS["gsm8k"].format(question=row["question"]),
            normalize_number(row["answer"].rsplit("####", 1)[1]),
            "auto",
        )
        for row in rows
    ]


def questions_for(args) -> list[Question]:
    """The bench's questions: ``--task gsm8k`` from ``--data`` (``--first`` on, or a seeded
    sample), or a seeded arithmetic ground."""
    if args.task == "gsm8k":
        if args.data is None:
            raise SystemExit("--task gsm8k needs --data PATH (a GSM8K-shaped JSONL)")
        return gsm8k_questions(Path(args.data), args.questions, args.seed, args.first)
    return GROUNDS[args.task](args.questions, args.seed)


def chat_prompts(tokenizer, questions: list[Question]) -> list[str]:
    """Each question as a one-turn chat, ready for the assistant's answer."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q.prompt}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


def model_and_prompts(args, questions: list[Question], console):
    """The model to launch (None with ``--url``), the tokenizer's path and tokenizer, and the
    questions as chat prompts; None, after saying why, when ``--url`` comes without ``--tokenizer``."""
    from transformers import AutoTokenizer

    from sglang_entropy.tools.model import build_default_model

    model_path = args.model_path or (None if args.url else build_default_model(progress=console.print))
    tokenizer_path = args.tokenizer or model_path
    if tokenizer_path is None:
        console.print("--url needs --tokenizer (a HF folder or hub id) to apply the chat template")
        return None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return model_path, tokenizer_path, tokenizer, chat_prompts(tokenizer, questions)


def arms(args) -> dict[str, dict | None]:
    deepconf = {"warmup_traces": args.warmup, "window_size": args.window, "top_k": 20}
    return {
        "full sampling": None,
        "DeepConf-low (p90)": {**deepconf, "percentile": 90},
        "DeepConf-high (p10)": {**deepconf, "percentile": 10},
    }


def ask(url: str, text: str, args, params: dict | None) -> list[dict]:
    entropy = {"return_signals": ["confidence"]}
    if params is not None:
        entropy.update(policy="deepconf", params=params)
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "n": args.budget,
        "custom_params": {"entropy": entropy},
    }
    response = requests.post(f"{url}/generate", json={"text": text, "sampling_params": sampling}, timeout=3600)
    if response.status_code != 200:
        raise RuntimeError(f"{url}/generate answered {response.status_code}: {response.text[:500]}")
    return response.json()


def score(question: Question, outputs: list[dict], window: int) -> dict:
    traces = traces_from_outputs(outputs)
    result = vote(traces, question.answer_format, window)
    finished = [t for t in traces if not t.stopped_early]
    correct = [extract_answer(t.text, question.answer_format) == question.answer for t in finished]
    return {
        "tokens": sum(o["meta_info"]["completion_tokens"] for o in outputs),
        "traces": len(outputs),
        "stopped_early": len(traces) - len(finished),
        "trace_accuracy": sum(correct) / len(correct) if correct else 0.0,
        "majority": result.majority == question.answer,
        "weighted": result.weighted == question.answer,
        "filtered": result.filtered == question.answer,
    }


SETTINGS = ("task", "questions", "first", "seed", "budget", "warmup", "window", "max_new_tokens", "temperature")


def run_prune(args) -> int:
    from sglang_entropy.tools import server as sglang_server

    console = Console()
    questions = questions_for(args)
    found = model_and_prompts(args, questions, console)
    if found is None:
        return 2
    model_path, tokenizer_path, _, texts = found
    plan = arms(args)
    rows = open_rows("prune", args, SETTINGS, model_path, tokenizer_path, console)
    if rows is None:
        return 2
    settings = rows.settings

    def answerer(url: str):
        def answer(arm: str, question: int, group: str, in_group: int) -> dict:
            return score(questions[question], ask(url, texts[question], args, plan[arm]), args.window)

        return answer

    complete = run_on_server(rows, list(plan), len(questions), args, model_path, "deepconf", answerer, console)
    records = reportable(rows, list(plan), console)
    if records is None:
        return 0 if complete else 130
    summary = summarize(records, {arm: wall_seconds(items) for arm, items in records.items()})
    device = "the server at " + args.url if args.url else ("GPU" if sglang_server.has_gpu() else "CPU (portable_cpu)")
    meta = {
        **settings,
        "command": bench_command("prune"),
        "device": device,
        "date": datetime.date.today().isoformat(),
        "progress": completeness(records, settings["questions"]),
    }
    write(Path(args.out), meta, summary, records)
    console.print(summary_table(summary, f"{args.task}: {meta['progress']} x {args.budget} traces, {device}"))
    console.print(f"results written to {args.out}.md, .json and .png")
    return 0 if complete else 130


def summary_table(summary: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("arm", "tokens", "vs full", "majority", "weighted", "top-10%", "per trace", "wall s", "vs full"):
        table.add_column(column)
    for row in summary:
        table.add_row(
            row["arm"],
            str(row["tokens"]),
            f"{row['token_ratio']:.3f}",
            f"{row['majority']:.3f}",
            f"{row['weighted']:.3f}",
            f"{row['filtered']:.3f}",
            f"{row['trace_accuracy']:.3f}",
            f"{row['seconds']:.1f}",
            f"{row['time_ratio']:.3f}",
        )
    return table


def summarize(records: dict[str, list[dict]], seconds: dict[str, float]) -> list[dict]:
    baseline = next(iter(records))
    base_tokens = sum(r["tokens"] for r in records[baseline])
    rows = []
    for arm, items in records.items():
        tokens = sum(r["tokens"] for r in items)
        rows.append(
            {
                "arm": arm,
                "tokens": tokens,
                "token_ratio": tokens / base_tokens,
                "stopped_early": sum(r["stopped_early"] for r in items),
                "traces": sum(r["traces"] for r in items),
                **{k: sum(r[k] for r in items) / len(items) for k in ("majority", "weighted", "filtered")},
                "trace_accuracy": sum(r["trace_accuracy"] for r in items) / len(items),
                "seconds": seconds[arm],
                "time_ratio": seconds[arm] / seconds[baseline],
            }
        )
    return rows


def write(prefix: Path, meta: dict, summary: list[dict], records: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=2))
    lines = [
        f"# Confidence pruning vs full sampling: {meta['task']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Server: {meta['device']}; model {card_text(meta['model'])}; "
        + (f"data {card_text(meta['data'])}; " if meta.get("data") else "")
        + f"{meta['progress']}, "
        f"{meta['budget']} traces per question in every arm; DeepConf warm-up {meta['warmup']} traces, "
        f"window {meta['window']} tokens; temperature {meta['temperature']}, at most {meta['max_new_tokens']} "
        f"new tokens; question seed {meta['seed']}; {meta['date']}.",
        "",
        "Votes: majority (self-consistency), confidence-weighted (weight = a trace's lowest group "
        "confidence), and weighted over the top-10% most confident traces. DeepConf arms vote only "
        "with the traces they did not stop. 'per trace': share of voting traces that are right.",
        "",
        "| arm | tokens | vs full | stopped early | majority | weighted | top-10% | per trace | wall s | vs full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['arm']} | {r['tokens']} | {r['token_ratio']:.3f} | {r['stopped_early']}/{r['traces']} "
            f"| {r['majority']:.3f} | {r['weighted']:.3f} | {r['filtered']:.3f} | {r['trace_accuracy']:.3f} "
            f"| {r['seconds']:.1f} | {r['time_ratio']:.3f} |"
        )
    if "CPU" in meta["device"]:
        lines += ["", "Wall times on a CPU are for the ratio only, not a speed claim."]
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")

    figure, (tokens_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["arm"] for r in summary]
    tokens_axis.bar(names, [r["token_ratio"] for r in summary], color=["gray", "tab:blue", "tab:green"])
    tokens_axis.set_ylabel("generated tokens (full sampling = 1)")
    width = 0.25
    for offset, key in enumerate(("majority", "weighted", "filtered")):
        accuracy_axis.bar(
            [i + (offset - 1) * width for i in range(len(names))], [r[key] for r in summary], width, label=key
        )
    accuracy_axis.set_xticks(range(len(names)), names)
    accuracy_axis.set_ylabel("vote accuracy")
    accuracy_axis.set_ylim(0, 1.25)
    accuracy_axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    accuracy_axis.legend(loc="upper center", ncol=3)
    for axis in (tokens_axis, accuracy_axis):
        axis.tick_params(axis="x", labelrotation=15)
    figure.suptitle(f"{meta['task']}: {meta['progress']} x {meta['budget']} traces")
    figure.tight_layout()
    figure.savefig(prefix.with_suffix(".png"), dpi=120)
