"""``sglang-entropy bench ccd``: SGLang's LowConfidence vs CCD vs CCD + early exit, side by side.

A fourth arm, one token per step (SGLang's LowConfidence with a threshold above 1, so only its
most-confident-position fallback fires), is the fixed-budget schedule that the CCD and SchED
papers measure their speed-ups against.

The dLLM algorithm is chosen when a server starts, so each arm is its own server: the same model
and block size, launched here (or given by URL). Every question goes to every arm in turn (the
order rotates per question), greedy, one request at a time; NFE comes from each response's
``meta_info["entropy"]``.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import requests
import yaml

from sglang_entropy.tools.commands import bench_command
from sglang_entropy.tools.model import card_text, model_card
from sglang_entropy_ccd.model import addition_problem, ensure_model


def arm_configs(args) -> list[tuple[str, str, dict]]:
    """(label, --dllm-algorithm, --dllm-algorithm-config) of each arm."""
    ccd = {"block_size": args.block_size, "budget": args.budget}
    return [
        ("LowConfidence", "LowConfidence", {"block_size": args.block_size, "threshold": args.threshold}),
        ("one token per step", "LowConfidence", {"block_size": args.block_size, "threshold": 1.01}),
        ("CCD", "CCD", ccd),
        (
            "CCD + early exit",
            "CCD",
            {
                **ccd,
                "early_exit": args.exit_schedule,
                "exit_tau_high": args.tau_high,
                "exit_tau_low": args.tau_low,
            },
        ),
    ]


def questions(args) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: held-out addition problems, or a JSONL of {question, answer}."""
    if args.data:
        rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
        random.Random(args.seed).shuffle(rows)
        return [(r["question"], str(r["answer"]).split("####")[-1].strip()) for r in rows[: args.questions]]
    rng = random.Random(args.seed)
    return [addition_problem(rng, 999) for _ in range(args.questions)]


def generate(url: str, prompt: str, max_new_tokens: int) -> tuple[dict, float]:
    started = time.perf_counter()
    body = {"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    response = requests.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    return response.json(), time.perf_counter() - started


def denoise_nfe(entropy: dict) -> int:
    return sum(e["nfe"] for e in entropy.get("events", []) if e.get("kind") == "block")


def run_ccd(args) -> int:
    from rich.progress import track

    from sglang_entropy.tools.server import launch

    arms = arm_configs(args)
    model_path = args.model_path or ensure_model()
    urls = dict(zip([a[0] for a in arms], args.urls.split(","), strict=True)) if args.urls else {}
    rows = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        for label, algorithm, config in arms:
            if label in urls:
                continue
            config_path = Path(tmp) / f"{label.replace(' ', '_').replace('+', '')}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            extra = ["--dllm-algorithm", algorithm, "--dllm-algorithm-config", str(config_path)]
            extra += ["--max-total-tokens", "8192"]
            print(f"launching {label}: {' '.join(extra[:4])}")
            urls[label] = stack.enter_context(launch(model_path, extra_args=extra)).url
        for index, (prompt, answer) in enumerate(track(questions(args), description="questions")):
            order = arms[index % len(arms) :] + arms[: index % len(arms)]
            for label, _, _ in order:
                out, seconds = generate(urls[label], prompt, args.max_new_tokens)
                entropy = out["meta_info"].get("entropy") or {}
                text = out["text"].strip()
                rows.append(
                    {
                        "question": index,
                        "arm": label,
                        "prompt": prompt,
                        "answer": answer,
                        "text": text,
                        "correct": text == answer,
                        "nfe": entropy.get("nfe"),
                        "denoise_nfe": denoise_nfe(entropy),
                        "tokens": out["meta_info"]["completion_tokens"],
                        "seconds": seconds,
                    }
                )
    summary = summarize(rows, [a[0] for a in arms])
    command = bench_command("ccd")
    meta = {"command": command, "model": model_card(Path(model_path)), "arms": arms, "questions": args.questions}
    write_report(Path(args.out), meta, summary, rows)
    for line in table(summary):
        print(line)
    return 0


def summarize(rows: list[dict], labels: list[str]) -> list[dict]:
    baseline = [r for r in rows if r["arm"] == labels[0]]
    base_nfe = sum(r["denoise_nfe"] for r in baseline)
    base_all = sum(r["nfe"] for r in baseline)
    base_time = sum(r["seconds"] for r in baseline)
    summary = []
    for label in labels:
        arm = [r for r in rows if r["arm"] == label]
        summary.append(
            {
                "arm": label,
                "accuracy": sum(r["correct"] for r in arm) / len(arm),
                "denoise_nfe_mean": sum(r["denoise_nfe"] for r in arm) / len(arm),
                "nfe_mean": sum(r["nfe"] for r in arm) / len(arm),
                "nfe_reduction_vs_lowconfidence": base_nfe / max(1, sum(r["denoise_nfe"] for r in arm)),
                "all_forwards_reduction": base_all / max(1, sum(r["nfe"] for r in arm)),
                "wall_ratio_vs_lowconfidence": sum(r["seconds"] for r in arm) / base_time,
            }
        )
    return summary


def table(summary: list[dict]) -> list[str]:
    lines = [
        "| arm | accuracy | denoising NFE / question | all forwards / question | NFE reduction vs LowConfidence "
        "(denoising; all) | wall time vs LowConfidence |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['arm']} | {s['accuracy']:.3f} | {s['denoise_nfe_mean']:.2f} | {s['nfe_mean']:.2f} | "
            f"{s['nfe_reduction_vs_lowconfidence']:.2f}x; {s['all_forwards_reduction']:.2f}x | "
            f"{s['wall_ratio_vs_lowconfidence']:.2f} |"
        )
    return lines


COLORS = ["#888888", "#bbbbbb", "#4c72b0", "#dd8452"]


def write_report(out: Path, meta: dict, summary: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    text = [
        "# Diffusion LM unmasking: LowConfidence vs CCD vs CCD + early exit",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Model: {card_text(meta['model'])}; {meta['questions']} questions, greedy, each question sent to every arm "
        "in turn.",
        "",
        *table(summary),
        "",
        "Denoising NFE counts the model forwards over generated blocks; all forwards adds the prompt-only "
        "blocks (the same in every arm). Wall times are CPU ratios. One token per step is SGLang's "
        "LowConfidence with threshold 1.01 (only its top-1 fallback commits), the fixed schedule the CCD and "
        "SchED papers compare against. The dotted line in the plot is half of LowConfidence's NFE.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(text))
    fig, (ax_nfe, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [s["arm"].replace(" ", "\n", 1) for s in summary]
    ax_nfe.bar(labels, [s["denoise_nfe_mean"] for s in summary], color=COLORS)
    ax_nfe.set_ylabel("denoising forwards per question")
    ax_nfe.axhline(summary[0]["denoise_nfe_mean"] / 2, color="#888888", linestyle=":", linewidth=1)
    ax_acc.bar(labels, [s["accuracy"] for s in summary], color=COLORS)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    for ax in (ax_nfe, ax_acc):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
