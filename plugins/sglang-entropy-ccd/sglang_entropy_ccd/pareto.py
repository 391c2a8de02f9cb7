"""``sglang-entropy bench ccd-pareto``: accuracy against model forwards per generated token, for
every unmasking schedule on the same held-out problems in one run.

Arms: one token per step (SGLang's LowConfidence with a threshold above 1: only its top-1
fallback commits), SGLang's LowConfidence over a sweep of its threshold, SGLang's
JointThreshold, CCD over its budget and expand settings, and CCD with the SchED early exit over
its thresholds. An SGLang dLLM algorithm is chosen when a server starts, so each LowConfidence
and JointThreshold setting is its own server; the CCD arms share one server and set their
parameters per request (``custom_params.entropy.params``). Servers run one after another;
greedy decoding and forward counts do not depend on the machine's speed, so nothing but wall
time could drift between them, and wall time is not reported.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests
import yaml

from sglang_entropy.tools.commands import bench_command

ONE_PER_STEP = "one token per step"
FAMILIES = (ONE_PER_STEP, "LowConfidence", "JointThreshold", "CCD", "CCD + early exit")


@dataclass(frozen=True)
class Arm:
    family: str
    label: str
    algorithm: str  # --dllm-algorithm of its server
    config: dict = field(hash=False)  # --dllm-algorithm-config of its server
    params: dict | None = field(default=None, hash=False)  # per-request parameters (CCD)

    @property
    def server(self) -> str:
        return f"{self.algorithm} {json.dumps(self.config, sort_keys=True)}"


def arms(args) -> list[Arm]:
    block = {"block_size": args.block_size}
    out = [Arm(ONE_PER_STEP, ONE_PER_STEP, "LowConfidence", {**block, "threshold": 1.01})]
    out += [
        Arm("LowConfidence", f"LowConfidence {t}", "LowConfidence", {**block, "threshold": t}) for t in args.thresholds
    ]
    out += [
        Arm("JointThreshold", f"JointThreshold {t}", "JointThreshold", {**block, "threshold": t})
        for t in args.joint_thresholds
    ]
    out += [
        Arm("CCD", f"CCD budget {b}, expand {e}", "CCD", block, {"budget": b, "expand_ratio": e})
        for b in args.budgets
        for e in args.expand_ratios
    ]
    out += [
        Arm(
            "CCD + early exit",
            f"CCD + exit, tau {high} -> {low}",
            "CCD",
            block,
            {"early_exit": args.exit_schedule, "exit_tau_high": high, "exit_tau_low": low},
        )
        for high, low in args.taus
    ]
    return out


def generate(url: str, prompt: str, max_new_tokens: int, params: dict | None) -> dict:
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0}
    if params:
        sampling["custom_params"] = {"entropy": {"params": params}}
    response = requests.post(f"{url}/generate", json={"text": prompt, "sampling_params": sampling}, timeout=600)
    response.raise_for_status()
    return response.json()


def run_pareto(args) -> int:
    from rich.progress import Progress
    from transformers import AutoTokenizer

    from sglang_entropy.tools.model import model_card
    from sglang_entropy.tools.server import launch
    from sglang_entropy_ccd.model import LONG_CONFIG, ensure_model, max_length, progression_problem, trained_with

    config = dataclasses.replace(LONG_CONFIG, steps=args.model_steps) if args.model_steps else LONG_CONFIG
    model_path = Path(args.model_path or ensure_model(config))
    trained = trained_with(model_path) or LONG_CONFIG
    rng = random.Random(args.seed)
    problems = [progression_problem(rng, trained.terms) for _ in range(args.questions)]
    # the model's own block size, and room up to its context length (prompts are 7 tokens)
    args.block_size = args.block_size or trained.block_size
    args.max_new_tokens = args.max_new_tokens or max_length(trained) - len(problems[0][0])
    plan = arms(args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    servers: dict[str, list[Arm]] = {}
    for arm in plan:
        servers.setdefault(arm.server, []).append(arm)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        task = progress.add_task("problems x arms", total=len(problems) * len(plan))
        for number, group in enumerate(servers.values()):
            config_path = Path(tmp) / f"server{number}.yaml"
            config_path.write_text(yaml.safe_dump(group[0].config))
            extra = ["--dllm-algorithm", group[0].algorithm, "--dllm-algorithm-config", str(config_path)]
            with launch(model_path, extra_args=[*extra, "--max-total-tokens", "16384"]) as server:
                for index, (prompt, answer) in enumerate(problems):
                    for arm in group[index % len(group) :] + group[: index % len(group)]:
                        out = generate(server.url, prompt, args.max_new_tokens, arm.params)
                        rows.append(
                            {
                                "arm": arm.label,
                                "question": index,
                                "correct": answer_text(out["output_ids"], tokenizer) == answer,
                                "forwards": out["meta_info"]["entropy"]["nfe"],
                                "tokens": answer_tokens(out["output_ids"], tokenizer),
                            }
                        )
                        progress.advance(task)
    summary = summarize(rows, plan)
    meta = {
        "command": bench_command("ccd-pareto"),
        "model": model_card(model_path),
        "questions": args.questions,
        "seed": args.seed,
        "block_size": args.block_size,
        "arms": [asdict(a) for a in plan],
    }
    write_report(Path(args.out), meta, summary, targets(summary), rows)
    print("\n".join(table(summary)))
    return 0


def answer_text(output_ids: list[int], tokenizer) -> str:
    """The answer a response gives: its tokens up to the first end-of-sequence. Every schedule
    is read the same way; SGLang's JointThreshold, unlike the others, does not stop at EOS and
    fills the rest of the block and of max_new_tokens after it."""
    end = output_ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in output_ids else len(output_ids)
    return tokenizer.decode(output_ids[:end], skip_special_tokens=True).strip()


def answer_tokens(output_ids: list[int], tokenizer) -> int:
    """Tokens of the answer, its end-of-sequence included (what forwards are counted per)."""
    eos = tokenizer.eos_token_id
    return output_ids.index(eos) + 1 if eos in output_ids else len(output_ids)


def summarize(rows: list[dict], plan: list[Arm]) -> list[dict]:
    """Per arm: accuracy with its Wilson 95% interval, forwards per token, and the ratio to one
    token per step."""
    from scipy.stats import binomtest

    summary = []
    for arm in plan:
        mine = [r for r in rows if r["arm"] == arm.label]
        forwards, tokens = sum(r["forwards"] for r in mine), sum(r["tokens"] for r in mine)
        right = sum(r["correct"] for r in mine)
        interval = binomtest(right, len(mine)).proportion_ci(method="wilson")
        summary.append(
            {
                "family": arm.family,
                "arm": arm.label,
                "accuracy": right / len(mine),
                "accuracy_ci": [interval.low, interval.high],
                "forwards_per_token": forwards / max(1, tokens),
            }
        )
    one = next(s for s in summary if s["family"] == ONE_PER_STEP)
    for s in summary:
        s["fewer_forwards_than_one_per_step"] = one["forwards_per_token"] / s["forwards_per_token"]
    return summary


def targets(summary: list[dict]) -> dict:
    """The issue's targets: CCD + exit at 4x fewer forwards than one token per step within 1 point
    of its accuracy; and at every accuracy LowConfidence reaches, CCD + exit with no more forwards."""
    one = next(s for s in summary if s["family"] == ONE_PER_STEP)
    exits = [s for s in summary if s["family"] == "CCD + early exit"]
    close = [s for s in exits if s["accuracy"] >= one["accuracy"] - 0.01]
    best = max(close, key=lambda s: s["fewer_forwards_than_one_per_step"], default=None)
    dominated = [
        low["arm"]
        for low in summary
        if low["family"] == "LowConfidence"
        and not any(
            e["accuracy"] >= low["accuracy"] and e["forwards_per_token"] <= low["forwards_per_token"] for e in exits
        )
    ]
    return {
        "4x_fewer_within_1_point": {
            "met": best is not None and best["fewer_forwards_than_one_per_step"] >= 4,
            "best_arm": best and best["arm"],
            "fewer_forwards": best and best["fewer_forwards_than_one_per_step"],
        },
        "no_more_forwards_than_lowconfidence_at_its_accuracy": {
            "met": not dominated,
            "lowconfidence_arms_not_matched": dominated,
        },
    }


def table(summary: list[dict]) -> list[str]:
    lines = [
        "| arm | accuracy [95% interval] | forwards per generated token | fewer forwards than one token per step |",
        "|---|---|---|---|",
    ]
    for s in summary:
        low, high = s["accuracy_ci"]
        lines.append(
            f"| {s['arm']} | {s['accuracy']:.3f} [{low:.2f}, {high:.2f}] | {s['forwards_per_token']:.3f} | "
            f"{s['fewer_forwards_than_one_per_step']:.2f}x |"
        )
    return lines


def write_report(out: Path, meta: dict, summary: list[dict], met: dict, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "targets": met, "rows": rows}))
    first, second = met["4x_fewer_within_1_point"], met["no_more_forwards_than_lowconfidence_at_its_accuracy"]
    text = [
        "# Diffusion LM unmasking: accuracy against forwards per generated token",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: {meta['model']['name']} (sha256 of its weights {meta['model']['sha256'][:16]}...): "
        f"{meta['model']['what']}; accuracy decoded one token per step on its own held-out problems: "
        f"{meta['model']['held_out_accuracy_one_token_per_step']:.3f}.  ",
        f"{meta['questions']} held-out problems (seed {meta['seed']}), greedy, block size {meta['block_size']}; "
        "forwards count every model forward of the request (prompt-only blocks included); tokens and the "
        "answer are read up to the first end-of-sequence (JointThreshold does not stop there). A block "
        "takes at least 2 forwards here (one that commits its last positions, one that caches it), "
        f"so no schedule can use fewer than about 2 forwards per {meta['block_size']} tokens.",
        "",
        *table(summary),
        "",
        "Targets:",
        f"- CCD + early exit at least 4x fewer forwards than one token per step, at most 1 point below its "
        f"accuracy: **{'met' if first['met'] else 'not met'}** (best within 1 point: {first['best_arm']}, "
        f"{(first['fewer_forwards'] or 0):.2f}x).",
        f"- At every accuracy LowConfidence reaches, CCD + early exit needs no more forwards: "
        f"**{'met' if second['met'] else 'not met'}**"
        + (f" (not matched: {', '.join(second['lowconfidence_arms_not_matched'])})." if not second["met"] else "."),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(text))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in FAMILIES:
        mine = sorted((s for s in summary if s["family"] == family), key=lambda s: s["forwards_per_token"])
        if mine:
            x, y = [s["forwards_per_token"] for s in mine], [s["accuracy"] for s in mine]
            spread = [
                [s["accuracy"] - s["accuracy_ci"][0] for s in mine],
                [s["accuracy_ci"][1] - s["accuracy"] for s in mine],
            ]
            ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=family)
    ax.set_xlabel("model forwards per generated token")
    ax.set_ylabel("accuracy (exact answer, Wilson 95% interval)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
