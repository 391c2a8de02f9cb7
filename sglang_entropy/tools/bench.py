"""Benchmarks that compare arms side by side in one run: same model, prompts and settings.

``overhead``: decode throughput of the SGLang server with the adapter disabled vs the same
server with ``--enable-entropy`` where every request asks for all signals (and, with
``--policy NAME --policy-params JSON``, a third arm that also runs that policy, e.g. deepconf
with a threshold it never reaches, so the policy's step runs but never stops a trace). Both
servers run at once and are measured alternately, round by round, so slow drift of the
machine hits both arms alike."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table

from sglang_entropy.signals import SIGNAL_NAMES
from sglang_entropy.tools import server as sglang_server
from sglang_entropy.tools.commands import bench_command
from sglang_entropy.tools.model import build_default_model, card_text, model_card

QUESTIONS = (
    "Tell me about the history of Rome.",
    "How do airplanes fly?",
    "Describe a walk in a forest.",
    "What makes a good friend?",
)


def timed_batch(url: str, prompts: list[str], new_tokens: int, entropy: dict | None) -> float:
    """Generate ``new_tokens`` for every prompt in one batch; return tokens per second."""
    sampling = {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0.7}
    if entropy is not None:
        sampling["custom_params"] = {"entropy": entropy}
    start = time.perf_counter()
    response = requests.post(f"{url}/generate", json={"text": prompts, "sampling_params": sampling}, timeout=1200)
    seconds = time.perf_counter() - start
    response.raise_for_status()
    tokens = sum(o["meta_info"]["completion_tokens"] for o in response.json())
    return tokens / seconds


def run_overhead(args) -> int:
    console = Console()
    model_path = args.model_path or build_default_model(progress=console.print)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    all_signals = {"return_signals": list(SIGNAL_NAMES)}
    arms = {"adapter disabled": None, "signals on": all_signals}
    if getattr(args, "policy", None):
        params = json.loads(args.policy_params or "{}")
        arms[f"signals + {args.policy}"] = {**all_signals, "policy": args.policy, "params": params}
    device = "GPU" if sglang_server.has_gpu() else "CPU (portable_cpu platform)"
    results = []
    with console.status("starting two SGLang servers (adapter disabled, adapter enabled)…"):
        with (
            sglang_server.launch(model_path, enable_entropy=False) as plain,
            sglang_server.launch(model_path, enable_entropy=True) as enabled,
        ):
            urls = {"adapter disabled": plain.url}
            urls.update({arm: enabled.url for arm in arms if arm != "adapter disabled"})
            for batch in batch_sizes:
                prompts = [QUESTIONS[i % len(QUESTIONS)] + f" (#{i})" for i in range(batch)]
                for arm, entropy in arms.items():  # warm-up
                    timed_batch(urls[arm], prompts, 8, entropy)
                samples = {arm: [] for arm in arms}
                for round_index in range(args.rounds):
                    order = list(arms) if round_index % 2 == 0 else list(reversed(arms))
                    for arm in order:
                        samples[arm].append(timed_batch(urls[arm], prompts, args.new_tokens, arms[arm]))
                    console.print(
                        f"batch {batch}, round {round_index + 1}/{args.rounds}: "
                        + ", ".join(f"{a} {samples[a][-1]:.1f} tok/s" for a in order)
                    )
                for arm in arms:
                    results.append(
                        {
                            "batch": batch,
                            "arm": arm,
                            "tok_per_s_median": statistics.median(samples[arm]),
                            "tok_per_s_samples": samples[arm],
                            "ratio_to_disabled": paired_ratio(samples[arm], samples["adapter disabled"]),
                        }
                    )
    command = bench_command("overhead")
    meta = {
        "command": command,
        "device": device,
        "model": model_card(Path(model_path)),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
    }
    write_results(Path(args.out), meta, results)
    table = Table(title=f"Decode throughput, {device}")
    for column in ("batch", "arm", "tok/s (median)", "vs disabled"):
        table.add_column(column)
    for r in results:
        table.add_row(str(r["batch"]), r["arm"], f"{r['tok_per_s_median']:.1f}", f"{r['ratio_to_disabled']:.3f}")
    console.print(table)
    console.print(f"results written to {args.out}.md and {args.out}.json")
    return 0


def paired_ratio(arm: list[float], baseline: list[float]) -> float:
    """Median over rounds of arm / baseline measured in the same round: each round runs every
    arm back to back, so the machine's drift between rounds cancels."""
    return statistics.median(a / b for a, b in zip(arm, baseline, strict=True))


def write_results(prefix: Path, meta: dict, results: list[dict]) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    absolute = (
        "Absolute tokens/s on a CPU are not a speed claim; compare the ratios." if "CPU" in meta["device"] else ""
    )
    lines = [
        "# Adapter overhead: decode throughput, side by side in one run",
        "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device']} ({meta['machine']}); model: {card_text(meta['model'])}; "
        f"{meta['new_tokens']} new tokens per request (ignore_eos, temperature 0.7); "
        f"{meta['rounds']} rounds, each running every arm back to back (order alternating); "
        "ratio = median over rounds of the arm's throughput over the disabled server's in that round; "
        f"{meta['date']}.",
        "",
        "| batch | arm | tokens/s (median) | ratio to adapter disabled (paired) | throughput change |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['batch']} | {r['arm']} | {r['tok_per_s_median']:.1f} | {r['ratio_to_disabled']:.3f} "
            f"| {100 * (r['ratio_to_disabled'] - 1):+.1f}% |"
        )
    lines += ["", absolute]
    prefix.with_suffix(".md").write_text("\n".join(lines).rstrip() + "\n")
