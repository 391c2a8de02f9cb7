"""``sglang-entropy bench tree``: every way this project spends M sequences on a question, side
by side in one run against one server: same model, questions, sampling settings and budget M.

Arms:
- full sampling: ``n`` = M traces.
- DeepConf-low: a deepconf group of M traces, ``warmup`` of them in full, the others pruned
  online below the 90th percentile of the warm-up traces' lowest group confidence.
- EAGer: one sequence that forks at high top-K entropy, up to M.
- EAGer-adapt: the same, drawing forks from a budget of ``adapt_share`` x M sequences per
  question shared by the questions of each batch.
- tree + DeepConf: ``warmup`` full traces calibrate the threshold as DeepConf-low does; then
  one composed request (eager + deepconf at that threshold) grows a tree of up to M - warmup
  sequences in which every sequence is pruned by the confidence of its whole trace.
- tree + DeepConf, budget: the same tree drawing forks from a shared budget; a pruned
  sequence gives its share back, so compute moves to the uncertain points of confident traces.

Every arm's tokens count all it generated (warm-up included; a child's shared prefix is not
generated again). Votes count the sequences no policy stopped; each votes with its whole text
and is weighted by the lowest group confidence of its whole trace. Intervals are bootstrap 95%
over questions (scipy), differences paired by question.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sglang_entropy.tools.commands import bench_command

ARMS = (
    "full sampling",
    "DeepConf-low",
    "EAGer",
    "EAGer-adapt",
    "tree + DeepConf",
    "tree + DeepConf, budget",
)
METRICS = ("majority", "weighted", "pass_at_k", "trace_accuracy")
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class Answered:
    """One sequence of an arm's answer to a question, rebuilt whole."""

    text: str
    confidences: list[float]  # the whole trace's token confidences
    pruned: bool  # a policy stopped it early: it does not vote


def post(url: str, text: str, sampling: dict) -> list[dict]:
    response = requests.post(f"{url}/generate", json={"text": text, "sampling_params": sampling}, timeout=3600)
    if response.status_code != 200:
        raise RuntimeError(f"{url}/generate answered {response.status_code}: {response.text[:500]}")
    outputs = response.json()
    return outputs if isinstance(outputs, list) else [outputs]


def plain(outputs: list[dict]) -> list[Answered]:
    return [
        Answered(
            o["text"],
            o["meta_info"]["entropy"]["signals"]["confidence"],
            bool((o["meta_info"].get("finish_reason") or {}).get("entropy_policy")),
        )
        for o in outputs
        if (o["meta_info"].get("finish_reason") or {}).get("type") != "abort"
    ]


def tree(outputs: list[dict], tokenizer) -> list[Answered]:
    """A tree's sequences with their whole texts and confidences (the ancestors' before each
    branch point, then their own)."""
    from sglang_entropy_branch.client import sequences, whole

    confidences = whole(outputs, lambda output: output["meta_info"]["entropy"]["signals"]["confidence"])
    finish = {o["meta_info"]["id"]: o["meta_info"].get("finish_reason") or {} for o in outputs}
    return [
        Answered(s.text, confidences[s.rid], bool(finish[s.rid].get("entropy_policy")))
        for s in sequences(outputs, tokenizer, lambda text: None)
    ]


class Runner:
    """Runs the arms on one server; ``args`` are the bench's options."""

    def __init__(self, url: str, args, tokenizer):
        self.url, self.args, self.tokenizer = url, args, tokenizer
        self.sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        self.signals = {"return_signals": ["confidence"]}

    def eager(self, sequences: int, budget_group: str | None, budget_per_question: float, questions: int) -> dict:
        params = {"threshold": self.args.eager_threshold, "max_sequences": sequences}
        if budget_group is not None:
            params.update(budget_group=budget_group, budget=max(1, round(budget_per_question * questions)))
        return params

    def answer(self, arm: str, text: str, budget_group: str, questions: int) -> tuple[list[Answered], int]:
        """(sequences, generated tokens) of ``arm`` for one question."""
        args = self.args
        if arm == "full sampling":
            outputs = post(
                self.url, text, {**self.sampling, "n": args.budget, "custom_params": {"entropy": self.signals}}
            )
            return plain(outputs), tokens(outputs)
        if arm == "DeepConf-low":
            deepconf = {"warmup_traces": args.warmup, "window_size": args.window, "percentile": 90}
            entropy = {**self.signals, "policy": "deepconf", "params": deepconf}
            outputs = post(self.url, text, {**self.sampling, "n": args.budget, "custom_params": {"entropy": entropy}})
            return plain(outputs), tokens(outputs)
        if arm in ("EAGer", "EAGer-adapt"):
            group = budget_group if arm == "EAGer-adapt" else None
            params = self.eager(args.budget, group, args.adapt_share * args.budget, questions)
            entropy = {**self.signals, "policy": "eager", "params": params}
            outputs = post(self.url, text, {**self.sampling, "custom_params": {"entropy": entropy}})
            return tree(outputs, self.tokenizer), tokens(outputs)
        return self.pruned_tree(text, budget_group if arm.endswith("budget") else None, questions)

    def pruned_tree(self, text: str, budget_group: str | None, questions: int) -> tuple[list[Answered], int]:
        from sglang_entropy_prune.voting import calibrated_threshold, lowest_group_confidence

        args = self.args
        warmup = post(self.url, text, {**self.sampling, "n": args.warmup, "custom_params": {"entropy": self.signals}})
        lowest = [
            lowest_group_confidence(o["meta_info"]["entropy"]["signals"]["confidence"], args.window) for o in warmup
        ]
        threshold = calibrated_threshold(lowest, 90)
        sequences = args.budget - args.warmup
        share = args.adapt_share * sequences
        policies = [
            {"policy": "eager", "params": self.eager(sequences, budget_group, share, questions)},
            {"policy": "deepconf", "params": {"threshold": threshold, "window_size": args.window}},
        ]
        outputs = post(
            self.url, text, {**self.sampling, "custom_params": {"entropy": {**self.signals, "policies": policies}}}
        )
        return plain(warmup) + tree(outputs, self.tokenizer), tokens(warmup) + tokens(outputs)


def tokens(outputs: list[dict]) -> int:
    return sum(o["meta_info"]["completion_tokens"] for o in outputs)


def score(question, answered: list[Answered], generated: int, window: int) -> dict:
    """One question's record in one arm."""
    from sglang_entropy_prune.voting import Trace, extract_answer, vote

    traces = [Trace(a.text, a.confidences, a.pruned) for a in answered]
    result = vote(traces, question.answer_format, window)
    answers = [extract_answer(a.text, question.answer_format) for a in answered]
    voting = [answer for answer, a in zip(answers, answered, strict=True) if not a.pruned]
    return {
        "tokens": generated,
        "sequences": len(answered),
        "pruned": sum(a.pruned for a in answered),
        "majority": result.majority == question.answer,
        "weighted": result.weighted == question.answer,
        "pass_at_k": question.answer in answers,
        "trace_accuracy": sum(a == question.answer for a in voting) / len(voting) if voting else 0.0,
    }


# --- statistics -------------------------------------------------------------------------------


def interval(values: np.ndarray, seed: int) -> tuple[float, float]:
    """Bootstrap 95% interval of the mean over questions."""
    from scipy.stats import bootstrap

    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = bootstrap((values,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", rng=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_interval(arm: np.ndarray, baseline: np.ndarray, seed: int) -> tuple[float, float]:
    """Bootstrap 95% interval of mean(arm) - mean(baseline), resampling questions."""
    return interval(arm.astype(float) - baseline.astype(float), seed)


def token_ratio_interval(arm: np.ndarray, baseline: np.ndarray, seed: int) -> tuple[float, float]:
    """Bootstrap 95% interval of sum(arm) / sum(baseline), resampling questions together."""
    from scipy.stats import bootstrap

    def ratio(a, b, axis=-1):
        return a.sum(axis=axis) / b.sum(axis=axis)

    result = bootstrap(
        (arm.astype(float), baseline.astype(float)),
        ratio,
        paired=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=seed,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize(records: dict[str, list[dict]], seconds: dict[str, float], seed: int) -> list[dict]:
    base = records["full sampling"]
    base_tokens = np.array([r["tokens"] for r in base])
    rows = []
    for arm, items in records.items():
        arm_tokens = np.array([r["tokens"] for r in items])
        row = {
            "arm": arm,
            "questions": len(items),
            "sequences": sum(r["sequences"] for r in items),
            "pruned": sum(r["pruned"] for r in items),
            "tokens": int(arm_tokens.sum()),
            "token_ratio": float(arm_tokens.sum() / base_tokens.sum()),
            "token_ratio_ci": token_ratio_interval(arm_tokens, base_tokens, seed),
            "seconds": seconds[arm],
            "time_ratio": seconds[arm] / seconds["full sampling"],
        }
        for metric in METRICS:
            values = np.array([float(r[metric]) for r in items])
            row[metric] = float(values.mean())
            row[f"{metric}_ci"] = interval(values, seed)
            row[f"{metric}_vs_full_ci"] = paired_interval(values, np.array([float(r[metric]) for r in base]), seed)
        rows.append(row)
    return rows


def targets(summary: list[dict]) -> dict[str, dict]:
    """The issue's targets, each with the numbers it was judged on. "At equal accuracy": the
    paired 95% interval of the difference to the reference reaches 0 or above."""
    by = {r["arm"]: r for r in summary}
    full, low, adapt = by["full sampling"], by["DeepConf-low"], by["EAGer-adapt"]
    best = max((low, adapt), key=lambda r: r["majority"])
    trees = [by["tree + DeepConf"], by["tree + DeepConf, budget"]]
    tree_ok = [t for t in trees if t["token_ratio"] <= 0.40 and t["majority"] >= best["majority"]]
    return {
        "DeepConf-low: >= 60% fewer tokens than full sampling at equal majority": {
            "met": low["token_ratio"] <= 0.40 and low["majority_vs_full_ci"][1] >= 0,
            "token_ratio": low["token_ratio"],
            "majority": (low["majority"], full["majority"]),
        },
        "EAGer-adapt: pass@k >= full sampling's at <= 50% of its tokens": {
            "met": adapt["token_ratio"] <= 0.50 and adapt["pass_at_k"] >= full["pass_at_k"],
            "met_within_interval": adapt["token_ratio"] <= 0.50 and adapt["pass_at_k_vs_full_ci"][1] >= 0,
            "token_ratio": adapt["token_ratio"],
            "pass_at_k": (adapt["pass_at_k"], full["pass_at_k"]),
        },
        "tree: majority >= the better of DeepConf-low and EAGer-adapt at <= 40% of full sampling's tokens": {
            "met": bool(tree_ok),
            "arms_that_meet_it": [t["arm"] for t in tree_ok],
            "better_of_the_two": (best["arm"], best["majority"]),
            "trees": {t["arm"]: (t["majority"], t["token_ratio"]) for t in trees},
        },
    }


# --- the run -----------------------------------------------------------------------------------


def questions_for(args):
    from sglang_entropy_prune import bench as grounds

    if args.task == "gsm8k":
        if args.data is None:
            raise SystemExit("--task gsm8k needs --data PATH (a GSM8K-shaped JSONL)")
        return grounds.gsm8k_questions(Path(args.data), args.questions, args.seed)
    return grounds.GROUNDS[args.task](args.questions, args.seed)


def run_tree(args) -> int:
    from sglang_entropy_prune.bench import model_and_prompts

    from sglang_entropy.tools import server as sglang_server
    from sglang_entropy.tools.model import model_card

    console = Console()
    if args.warmup >= args.budget:
        console.print("--warmup must be below --budget: the trees need sequences of their own")
        return 2
    questions = questions_for(args)
    found = model_and_prompts(args, questions, console)
    if found is None:
        return 2
    model_path, tokenizer_path, tokenizer, texts = found
    records = {arm: [] for arm in ARMS}
    seconds = dict.fromkeys(ARMS, 0.0)
    launched = sglang_server.server_url(
        args.url, model_path, ["--entropy-policies", "deepconf,eager"], progress=console.print
    )
    with launched as url, Progress(console=console) as progress:
        runner = Runner(url, args, tokenizer)
        task = progress.add_task("questions", total=len(questions))
        for start in range(0, len(questions), args.concurrency):
            chunk = list(range(start, min(start + args.concurrency, len(questions))))
            shift = (start // args.concurrency) % len(ARMS)
            for arm in ARMS[shift:] + ARMS[:shift]:  # rotating, so drift of the machine hits every arm alike
                group = uuid.uuid4().hex
                begin = time.perf_counter()
                with ThreadPoolExecutor(len(chunk)) as pool:
                    asked = [(arm, texts[i], group, len(chunk)) for i in chunk]
                    answers = list(pool.map(lambda job: runner.answer(*job), asked))
                seconds[arm] += time.perf_counter() - begin
                for i, (answered, generated) in zip(chunk, answers, strict=True):
                    records[arm].append({"question": i, **score(questions[i], answered, generated, args.window)})
            progress.advance(task, len(chunk))
    summary = summarize(records, seconds, args.seed)
    met = targets(summary)
    meta = {
        **{k: v for k, v in vars(args).items() if k not in ("func", "command", "model_builders")},
        "command": bench_command("tree"),
        "model": model_card(Path(model_path)) if model_path else {"name": tokenizer_path},
        "device": "the server at " + args.url if args.url else ("GPU" if sglang_server.has_gpu() else "CPU"),
        "date": datetime.date.today().isoformat(),
    }
    meta.pop("model_path", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": summary, "targets": met, "records": records}, indent=2)
    )
    write_report(out, meta, summary, met)
    console.print(summary_table(summary, f"{args.task}: {len(questions)} questions, M = {args.budget}"))
    console.print(f"results written to {out}.md, .json and .png")
    return 0


def summary_table(summary: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("arm", "tokens vs full", "majority", "weighted", "pass@k", "per trace", "wall vs full"):
        table.add_column(column)
    for r in summary:
        table.add_row(
            r["arm"],
            f"{r['token_ratio']:.3f}",
            f"{r['majority']:.3f}",
            f"{r['weighted']:.3f}",
            f"{r['pass_at_k']:.3f}",
            f"{r['trace_accuracy']:.3f}",
            f"{r['time_ratio']:.2f}",
        )
    return table


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, (list, tuple)):
        return type(value)(_rounded(v) for v in value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _ci(r: dict, key: str) -> str:
    low, high = r[f"{key}_ci"]
    return f"{r[key]:.3f} [{low:.3f}, {high:.3f}]"


def write_report(out: Path, meta: dict, summary: list[dict], met: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = meta["model"]
    checksum = f" (sha256 of its weights {model['sha256'][:16]}...)" if "sha256" in model else ""
    lines = [
        f"# Trees, pruning and full sampling on one budget: {meta['task']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: {model['name']}{checksum}; {meta['device']}; {meta['questions']} questions (seed {meta['seed']}); "
        f"M = {meta['budget']} sequences per question; warm-up {meta['warmup']} traces; group-confidence window "
        f"{meta['window']}; top-K entropy threshold {meta['eager_threshold']}; budgets {meta['adapt_share']} x the "
        f"sequences per question, shared by the {meta['concurrency']} questions of a batch; temperature "
        f"{meta['temperature']}; at most {meta['max_new_tokens']} new tokens; {meta['date']}.",
        "",
        "Tokens: all generated, warm-up included (a child's shared prefix is not generated again). Votes: the "
        "sequences no policy stopped, each with its whole text; weighted by the lowest group confidence of its "
        "whole trace. pass@k: any sequence right. Brackets: bootstrap 95% intervals over questions.",
        "",
        "| arm | sequences (pruned) | tokens vs full | majority | weighted | pass@k | per trace | wall vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        low, high = r["token_ratio_ci"]
        lines.append(
            f"| {r['arm']} | {r['sequences']} ({r['pruned']}) | {r['token_ratio']:.3f} [{low:.3f}, {high:.3f}] "
            f"| {_ci(r, 'majority')} | {_ci(r, 'weighted')} | {_ci(r, 'pass_at_k')} | {_ci(r, 'trace_accuracy')} "
            f"| {r['time_ratio']:.2f} |"
        )
    lines += ["", "Targets:"]
    for name, result in met.items():
        details = "; ".join(f"{k.replace('_', ' ')}: {_rounded(v)}" for k, v in result.items() if k != "met")
        lines.append(f"- {name}: **{'met' if result['met'] else 'not met'}** ({details})")
    if "GPU" not in meta["device"]:
        lines += ["", "Wall times on a CPU are for the ratio only, not a speed claim."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    figure, (tokens_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["arm"] for r in summary]
    ratios = [r["token_ratio"] for r in summary]
    errors = np.array(
        [[r["token_ratio"] - r["token_ratio_ci"][0], r["token_ratio_ci"][1] - r["token_ratio"]] for r in summary]
    )
    tokens_axis.bar(names, ratios, yerr=errors.T, capsize=3, color="tab:gray")
    tokens_axis.set_ylabel("generated tokens (full sampling = 1)")
    width = 0.2
    for offset, key in enumerate(("majority", "weighted", "pass_at_k", "trace_accuracy")):
        values = [r[key] for r in summary]
        spans = np.array([[r[key] - r[f"{key}_ci"][0], r[f"{key}_ci"][1] - r[key]] for r in summary])
        positions = [i + (offset - 1.5) * width for i in range(len(names))]
        accuracy_axis.bar(positions, values, width, yerr=spans.T, capsize=2, label=key)
    accuracy_axis.set_xticks(range(len(names)), names)
    accuracy_axis.set_ylim(0, 1.25)
    accuracy_axis.set_ylabel("accuracy")
    accuracy_axis.legend(loc="upper center", ncol=4, fontsize=8)
    for axis in (tokens_axis, accuracy_axis):
        axis.tick_params(axis="x", labelrotation=25, labelsize=8)
    figure.suptitle(f"{meta['task']}: {meta['questions']} questions, M = {meta['budget']}, {model['name']}")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
