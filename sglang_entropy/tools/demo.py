"""The main job: launch SGLang with the adapter on the default model, run a handful of prompts,
print each answer coloured by per-token entropy and plot entropy and confidence per token."""

from __future__ import annotations

import math
import time

import requests
from rich.console import Console
from rich.text import Text

from sglang_entropy.tools import server as sglang_server
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


def plot(outputs: list[dict], questions, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(outputs), 1, figsize=(10, 2.6 * len(outputs)), squeeze=False)
    for ax, output, question in zip(axes[:, 0], outputs, questions, strict=True):
        signals = output["meta_info"]["entropy"]["signals"]
        ax.plot(signals["entropy"], label="entropy (nats)", color="tab:red")
        ax.plot(signals["confidence"], label="confidence (-mean top-20 logprob)", color="tab:blue")
        ax.set_title(question, fontsize=9)
        ax.set_xlabel("output token")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_demo(args) -> int:
    console = Console()
    model_path = args.model_path or build_default_model(progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    where = "GPU" if sglang_server.has_gpu() else "CPU (portable_cpu platform)"
    with console.status(f"starting the SGLang server on {where}…") as status:

        def progress(seconds):
            status.update(f"starting the SGLang server on {where}… {seconds:.0f} s")

        with sglang_server.launch(model_path, enable_entropy=True, progress=progress) as server:
            status.update("generating…")
            start = time.monotonic()
            prompts = [chat_prompt(tokenizer, q) for q in PROMPTS]
            outputs = generate_with_signals(server.url, prompts, args.max_new_tokens)
            seconds = time.monotonic() - start
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
    plot(outputs, PROMPTS, args.plot)
    console.print(
        f"{sum(len(o['output_ids']) for o in outputs)} tokens in {seconds:.1f} s; plot written to {args.plot}"
    )
    return 0
