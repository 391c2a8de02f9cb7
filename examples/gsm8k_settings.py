"""Choose the GSM8K tree bench's settings on questions that are never reported (items 1000+).

Samples ``--traces`` full traces of each question on the launched server (the bench's prompt,
chat template and temperature) with every token's DeepConf confidence and top-K entropy, keeps
them in ``--traces-file`` (a rerun adds only the missing questions), and reads off:

- ``max_new_tokens``: the smallest of the candidates under which at least 90% of the traces end
  on their own (a trace of L tokens ends under any limit >= L), and how many of those that did
  not end within the largest candidate repeat themselves (a loop);
- the group-confidence window: the candidate whose lowest group confidence best separates right
  from wrong traces (AUROC), beside the mean confidence's AUROC;
- the EAGer threshold: the top-K entropy that a trace crosses M - 1 times on average, so an
  unconstrained tree just fills its M sequences.

    python examples/gsm8k_settings.py --model-path MODEL --data ../shared/data/gsm8k_test.jsonl \\
        --first 1000 --questions 20 --out examples/results/gsm8k_settings
"""

from __future__ import annotations

import argparse
import json
import sys
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from sglang_entropy_branch.tree_bench import auroc
from sglang_entropy_prune.bench import SYSTEM_PROMPTS, model_and_prompts, questions_for
from sglang_entropy_prune.voting import extract_answer, lowest_group_confidence

from sglang_entropy.tools import server as sglang_server
from sglang_entropy.tools.commands import command_line, without_paths
from sglang_entropy.tools.model import cache_dir, data_card, model_card

LIMITS = (384, 512, 640, 768, 896, 1024)
WINDOWS = (16, 32, 64, 128, 256)


def sample(url: str, text: str, args) -> list[dict]:
    entropy = {"return_signals": ["confidence", "topk_entropy"]}
    sampling = {
        "max_new_tokens": max(LIMITS),
        "temperature": args.temperature,
        "n": args.traces,
        "custom_params": {"entropy": entropy},
    }
    response = requests.post(f"{url}/generate", json={"text": text, "sampling_params": sampling}, timeout=3600)
    response.raise_for_status()
    return response.json()


def loops(token_ids: list[int], tail: int = 200, span: int = 20) -> bool:
    """The last ``tail`` tokens hold some ``span``-token run at least three times: a loop."""
    ids = token_ids[-tail:]
    seen: dict[tuple, int] = {}
    for i in range(len(ids) - span + 1):
        key = tuple(ids[i : i + span])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= 3:
            return True
    return False


def collect(args, path: Path) -> list[dict]:
    done = {json.loads(line)["item"] for line in path.read_text().splitlines()} if path.exists() else set()
    questions = questions_for(args)
    todo = [i for i in range(len(questions)) if args.first + i not in done]
    if todo:
        model_path, _, _, texts = model_and_prompts(args, questions, print)
        with sglang_server.launch(model_path, extra_args=["--entropy-policies", "deepconf"]) as server:

            def one(i: int) -> list[dict]:
                outputs = sample(server.url, texts[i], args)
                return [
                    {
                        "item": args.first + i,
                        "text": o["text"],
                        "right": extract_answer(o["text"], "auto") == questions[i].answer,
                        "tokens": o["meta_info"]["completion_tokens"],
                        "finish": (o["meta_info"].get("finish_reason") or {}).get("type"),
                        "loops": loops(o["output_ids"]),
                        "confidence": o["meta_info"]["entropy"]["signals"]["confidence"],
                        "topk_entropy": o["meta_info"]["entropy"]["signals"]["topk_entropy"],
                    }
                    for o in outputs
                ]

            with ThreadPoolExecutor(args.concurrency) as pool, open(path, "a") as f:
                for traces in pool.map(one, todo):
                    f.writelines(json.dumps(t) + "\n" for t in traces)
                    f.flush()
                    print(f"item {traces[0]['item']}: {sum(t['right'] for t in traces)} of {len(traces)} right")
    return [
        t for line in path.read_text().splitlines() if (t := json.loads(line))["item"] - args.first < args.questions
    ]


def choose(traces: list[dict], budget: int) -> dict:
    lengths = np.array([t["tokens"] for t in traces])
    ended = np.array([t["finish"] == "stop" for t in traces])
    finished = {limit: float(np.mean(ended & (lengths <= limit))) for limit in LIMITS}
    limit = next((limit for limit in LIMITS if finished[limit] >= 0.9), max(LIMITS))
    right = [t["right"] for t in traces]
    by_window = {w: auroc([lowest_group_confidence(t["confidence"], w) for t in traces], right) for w in WINDOWS}
    window = max(by_window, key=lambda w: by_window[w] or 0)
    entropies = [np.array(t["topk_entropy"][: min(t["tokens"], limit)]) for t in traces]
    candidates = np.round(np.arange(0.5, 4.01, 0.05), 2)
    crossings = {float(c): float(np.mean([np.sum(e > c) for e in entropies])) for c in candidates}
    threshold = min(crossings, key=lambda c: abs(crossings[c] - (budget - 1)))
    unfinished = [t for t in traces if t["finish"] != "stop"]
    return {
        "traces": len(traces),
        "right": int(sum(right)),
        "finished_within": finished,
        "max_new_tokens": limit,
        "unfinished_at_largest": len(unfinished),
        "of_which_loop": sum(t["loops"] for t in unfinished),
        "auroc_lowest_by_window": by_window,
        "auroc_mean": auroc([float(np.mean(t["confidence"])) for t in traces], right),
        "window": window,
        "eager_threshold": threshold,
        "crossings_per_trace_at_threshold": crossings[threshold],
        "topk_entropy_quantiles": {
            q: float(np.quantile(np.concatenate(entropies), q / 100)) for q in (50, 90, 95, 99, 99.9)
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--first", type=int, default=1000)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--traces", type=int, default=8, help="traces per question (the bench's M)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--traces-file",
        default=str(cache_dir() / "gsm8k_settings_traces.jsonl"),
        help="where the sampled traces are kept (a rerun adds only the missing questions)",
    )
    parser.add_argument("--out", default="examples/results/gsm8k_settings")
    args = parser.parse_args(argv)
    if args.first < 1000:
        parser.error("--first must be 1000 or more: settings are never chosen on the reported questions 0-99")
    bench_args = Namespace(**vars(args), task="gsm8k", seed=0, url=None, tokenizer=None)
    traces = collect(bench_args, Path(args.traces_file))
    chosen = choose(traces, args.traces)
    meta = {
        "command": "python examples/gsm8k_settings.py " + command_line(without_paths(sys.argv[1:])),
        "model": model_card(Path(args.model_path)),
        "data": data_card(Path(args.data)),
        "items": [args.first, args.first + args.questions - 1],
        "temperature": args.temperature,
        "prompt": SYSTEM_PROMPTS["gsm8k"] + " (in the model's chat template)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "chosen": chosen}, indent=1))
    print(json.dumps(chosen, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
