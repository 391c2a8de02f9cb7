"""The main job: launch SGLang with the adapter on the default model, run a handful of prompts,
print each answer coloured by per-token entropy and plot entropy and confidence per token; then
a small side-by-side on arithmetic questions: full sampling against each installed policy's demo
arm (``register_commands``), with the tokens each generated and the accuracy of its majority vote."""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from sglang_entropy.tools import server as sglang_server
from sglang_entropy.tools.commands import DemoAnswer, DemoArm
from sglang_entropy.tools.model import build_default_model

PROMPTS = (
    "What is the capital of France?",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Write one sentence about the sea.",
    "Name a colour that starts with the letter G.",
)
SIGNALS = ("entropy", "confidence", "margin")


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def generate_with_signals(url: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
    body = {
        "text": prompts,
        "return_logprob": True,
        "return_text_in_logprobs": True,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0,
            "custom_params": {"entropy": {"return_signals": list(SIGNALS)}},
        },
    }
    response = requests.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    return response.json()


def entropy_style(value: float, max_entropy: float) -> str:
    """Green for a sure token, through yellow, to red for an unsure one."""
    x = min(1.0, value / max_entropy)
    red, green = int(255 * min(1.0, 2 * x)), int(255 * min(1.0, 2 * (1 - x)))
    return f"rgb({red},{green},0)"


def coloured(output: dict, max_entropy: float = 4.0) -> Text:
    text = Text()
    tokens = [entry[2] for entry in output["meta_info"]["output_token_logprobs"]]
    for token, value in zip(tokens, output["meta_info"]["entropy"]["signals"]["entropy"], strict=True):
        text.append(token, style=entropy_style(value, max_entropy))
    return text


SIDE_BY_SIDE_SAMPLING = {"max_new_tokens": 32, "temperature": 0.7}


def arithmetic_questions(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer): one-digit additions, where the default model is often but not always
    right, so a vote has something to gain."""
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(count)]
    return [(f"What is {a} + {b}? Answer with just the number.", str(a + b)) for a, b in pairs]


def last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d+", text)
    return numbers[-1] if numbers else None


def majority(texts: list[str]) -> str | None:
    counts = Counter(a for a in map(last_number, texts) if a is not None)
    return counts.most_common(1)[0][0] if counts else None


def full_sampling(url: str, prompt: str, sequences: int, sampling: dict, tokenizer) -> DemoAnswer:
    """The baseline: ``sequences`` traces sampled in full, every one votes."""
    body = {"text": prompt, "sampling_params": {**sampling, "n": sequences}}
    response = requests.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    outputs = response.json()
    return DemoAnswer([o["text"] for o in outputs], sum(o["meta_info"]["completion_tokens"] for o in outputs))


def side_by_side(url: str, tokenizer, arms: list[DemoArm], questions, sequences: int, console) -> list[dict]:
    """Every arm on every question (4 questions in flight), the arms' order rotating per
    question batch; returns a row per arm: tokens, ratio to full sampling, vote accuracy."""
    arms = [DemoArm("full sampling", "", full_sampling), *arms]
    tokens, right = Counter(), Counter()
    prompts = [chat_prompt(tokenizer, q) for q, _ in questions]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("side by side", total=len(questions) * len(arms))
        for start in range(0, len(questions), 4):
            batch = range(start, min(start + 4, len(questions)))
            shift = (start // 4) % len(arms)
            for arm in arms[shift:] + arms[:shift]:

                def ask(i, arm=arm):
                    return arm.ask(url, prompts[i], sequences, SIDE_BY_SIDE_SAMPLING, tokenizer)

                with ThreadPoolExecutor(len(batch)) as pool:
                    for i, answer in zip(batch, pool.map(ask, batch), strict=True):
                        tokens[arm.name] += answer.tokens
                        right[arm.name] += majority(answer.texts) == questions[i][1]
                progress.advance(task, len(batch))
    return [
        {
            "arm": arm.name,
            "tokens": tokens[arm.name],
            "vs_full": tokens[arm.name] / max(1, tokens["full sampling"]),
            "accuracy": right[arm.name] / len(questions),
        }
        for arm in arms
    ]


def savings_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("arm", "tokens", "vs full sampling", "majority vote accuracy"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["arm"], str(row["tokens"]), f"{row['vs_full']:.2f}", f"{row['accuracy']:.2f}")
    return table


def plot(outputs: list[dict], questions, path: str, savings: list[dict] | None = None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(outputs) + (1 if savings else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.6 * rows), squeeze=False)
    if savings:
        plot_savings(axes[-1, 0], savings, title)
    for ax, output, question in zip(axes[:, 0], outputs, questions, strict=False):
        signals = output["meta_info"]["entropy"]["signals"]
        ax.plot(signals["entropy"], label="entropy (nats)", color="tab:red")
        ax.plot(signals["confidence"], label="confidence (-mean top-20 logprob)", color="tab:blue")
        ax.set_title(question, fontsize=9)
        ax.set_xlabel("output token")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_savings(ax, savings: list[dict], title: str) -> None:
    names = [row["arm"] for row in savings]
    bars = ax.bar(names, [row["vs_full"] for row in savings], color="tab:gray")
    for bar, row in zip(bars, savings, strict=True):
        ax.annotate(
            f"{row['tokens']} tokens\nvote accuracy {row['accuracy']:.2f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylim(0, 1.45)
    ax.set_ylabel("tokens (full sampling = 1)")
    ax.set_title(title, fontsize=9)


def run_demo(args) -> int:
    console = Console()
    model_path = args.model_path or build_default_model(progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    where = "GPU" if sglang_server.has_gpu() else "CPU (portable_cpu platform)"
    with console.status(f"starting the SGLang server on {where}…") as status:

        def progress(seconds):
            status.update(f"starting the SGLang server on {where}… {seconds:.0f} s")

        arms = list(getattr(args, "demo_arms", [])) if args.questions > 0 else []
        policies = ["--entropy-policies", ",".join(arm.policy for arm in arms)] if arms else []
        with sglang_server.launch(model_path, enable_entropy=True, progress=progress, extra_args=policies) as server:
            status.update("generating…")
            start = time.monotonic()
            prompts = [chat_prompt(tokenizer, q) for q in PROMPTS]
            outputs = generate_with_signals(server.url, prompts, args.max_new_tokens)
            seconds = time.monotonic() - start
            status.stop()
            questions = arithmetic_questions(args.questions)
            savings = side_by_side(server.url, tokenizer, arms, questions, args.sequences, console) if arms else None
    log_vocab = math.log(len(tokenizer))
    console.print(
        f"[bold]sglang-entropy demo[/bold]: {model_path} on {where}; colour = entropy per token "
        f"([green]sure[/green] → [red]unsure[/red], log V = {log_vocab:.1f} nats)\n"
    )
    for question, output in zip(PROMPTS, outputs, strict=True):
        signals = output["meta_info"]["entropy"]["signals"]
        mean_entropy = sum(signals["entropy"]) / max(1, len(signals["entropy"]))
        console.print(f"[bold]Q:[/bold] {question}")
        console.print(Text("A: ").append_text(coloured(output)))
        console.print(
            f"[dim]{len(signals['entropy'])} tokens, mean entropy {mean_entropy:.2f} nats, "
            f"mean confidence {sum(signals['confidence']) / max(1, len(signals['confidence'])):.2f}[/dim]\n"
        )
    console.print(f"{sum(len(o['output_ids']) for o in outputs)} tokens in {seconds:.1f} s\n")
    title = (
        f"{args.questions} one-digit additions, {args.sequences} sequences per question in every arm, "
        f"temperature {SIDE_BY_SIDE_SAMPLING['temperature']}"
    )
    if savings:
        console.print(savings_table(savings, title))
    else:
        console.print("[dim]no policy with a demo arm is installed (e.g. plugins/sglang-entropy-prune)[/dim]")
    plot(outputs, PROMPTS, args.plot, savings, title)
    console.print(f"plot written to {args.plot}")
    return 0
