"""``sglang-entropy bench branch``: full parallel sampling (n = max_sequences) vs EAGer vs
EAGer-adapt, side by side in one run: same server, model and questions.

Full sampling runs every question with ``n`` = M traces. EAGer starts one sequence per
question and forks at high top-K entropy, up to M. EAGer-adapt runs the questions of each
batch as one budget group holding ``adapt_share`` x M sequences per question, which forks
draw from wherever they are needed (each question still capped at M). Reported: pass@k (any
sequence right), majority-vote accuracy, generated tokens and wall time.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sglang_entropy.tools.commands import bench_command
from sglang_entropy_branch.client import majority, sequences


def _post(url: str, body: dict) -> tuple[list[dict], float]:
    start = time.perf_counter()
    response = requests.post(f"{url}/generate", json=body, timeout=3600)
    if response.status_code != 200:
        raise RuntimeError(f"{url}/generate answered {response.status_code}: {response.text[:500]}")
    outputs = response.json()
    return (outputs if isinstance(outputs, list) else [outputs]), time.perf_counter() - start


def run_arm(url, arm, texts, args, group):
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    eager = {"threshold": args.threshold, "max_sequences": args.max_sequences}
    if arm == "EAGer-adapt":
        eager.update(budget_group=group, budget=int(args.adapt_share * args.max_sequences * len(texts)))

    def one(text):
        if arm == "full sampling":
            body = {"text": text, "sampling_params": {**sampling, "n": args.max_sequences}}
        else:
            entropy = {"policy": "eager", "params": eager}
            body = {"text": text, "sampling_params": {**sampling, "custom_params": {"entropy": entropy}}}
        return _post(url, body)[0]

    with ThreadPoolExecutor(len(texts)) as pool:
        return list(pool.map(one, texts))


def run_branch(args) -> int:
    from sglang_entropy_prune.bench import arithmetic_questions, chat_prompts, gsm8k_questions
    from transformers import AutoTokenizer

    from sglang_entropy.tools import server as sglang_server
    from sglang_entropy.tools.model import build_default_model

    console = Console()
    if args.task == "gsm8k":
        questions = gsm8k_questions(Path(args.data), args.questions, args.seed)
    else:
        questions = arithmetic_questions(args.questions, args.seed)
    model_path = args.model_path or (None if args.url else build_default_model(progress=console.print))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_path)
    texts = chat_prompts(tokenizer, questions)
    arms = ("full sampling", "EAGer", "EAGer-adapt")
    scores = {arm: [] for arm in arms}
    seconds = dict.fromkeys(arms, 0.0)
    launched = sglang_server.server_url(args.url, model_path, ["--entropy-policies", "eager"], progress=console.print)
    with launched as url, Progress(console=console) as progress:
        task = progress.add_task("questions", total=len(questions))
        for start in range(0, len(questions), args.concurrency):
            chunk = list(range(start, min(start + args.concurrency, len(questions))))
            shift = (start // args.concurrency) % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                begin = time.perf_counter()
                answers = run_arm(url, arm, [texts[i] for i in chunk], args, uuid.uuid4().hex)
                seconds[arm] += time.perf_counter() - begin
                for i, outputs in zip(chunk, answers, strict=True):
                    scores[arm].append(score(i, questions[i], arm, outputs, tokenizer))
            progress.advance(task, len(chunk))
    summary = summarize(arms, scores, seconds, len(questions))
    command = bench_command("branch")
    meta = {
        **{k: v for k, v in vars(args).items() if k not in ("func", "command", "model_builders")},
        "command": command,  # after the arguments: argparse's own "command" is the subcommand's name
        "date": datetime.date.today().isoformat(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "records": scores}, indent=2))
    console.print(summary_table(summary, f"{args.task}: {len(questions)} questions, M = {args.max_sequences}"))
    write_report(out, meta, summary)
    console.print(f"results written to {out}.md, .json and .png")
    return 0


def score(index: int, question, arm: str, outputs: list[dict], tokenizer) -> dict:
    """One question's record in one arm: its sequences, tokens, pass@k and majority."""
    from sglang_entropy_prune.voting import extract_answer

    fmt = question.answer_format
    if arm == "full sampling":
        found = [extract_answer(o["text"], fmt) for o in outputs]
    else:
        found = [s.answer for s in sequences(outputs, tokenizer, lambda t, f=fmt: extract_answer(t, f))]
    return {
        "question": index,
        "sequences": len(outputs),
        "tokens": sum(o["meta_info"]["completion_tokens"] for o in outputs),
        "pass": question.answer in found,
        "majority": majority(found) == question.answer,
    }


def summarize(arms, scores: dict[str, list[dict]], seconds: dict[str, float], questions: int) -> list[dict]:
    base_tokens = sum(r["tokens"] for r in scores["full sampling"])
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
        for arm in arms
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
        f"{meta['questions']} questions; M = {meta['max_sequences']} sequences per question (full sampling: n = M; "
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
    figure.suptitle(f"{meta['task']}: {meta['questions']} questions, M = {meta['max_sequences']}")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
