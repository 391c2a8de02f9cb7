"""Command line: ``sglang-entropy plugins | build-model | demo | bench``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys


def bench_command(name: str) -> str:
    """The ``sglang-entropy bench ...`` command line this process runs, as recorded in results
    (``sglang-entropy bench NAME`` when the bench was called from Python, not the CLI)."""
    import shlex

    if "bench" not in sys.argv:
        return f"sglang-entropy bench {name}"
    return "sglang-entropy bench " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("bench") + 1 :])


def cmd_plugins(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from sglang_entropy.registry import installed_policies

    registry = installed_policies()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": p.spec.name,
                        "package": p.distribution,
                        "version": p.version,
                        "description": p.spec.description,
                        "params": p.spec.params.model_json_schema(),
                    }
                    for p in registry
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="Installed sglang-entropy policies")
    for column in ("policy", "package", "version", "parameters"):
        table.add_column(column)
    for p in registry:
        params = ", ".join(
            f"{name}: {info.annotation.__name__ if hasattr(info.annotation, '__name__') else info.annotation}"
            + ("" if info.is_required() else f" = {info.default!r}")
            for name, info in p.spec.params.model_fields.items()
        )
        table.add_row(p.spec.name, p.distribution or "?", p.version or "?", params)
    Console().print(table)
    if not registry.names():
        print("No policies installed: pip install a policy package, e.g. plugins/sglang-entropy-prune")
    return 0


def cmd_build_model(args) -> int:
    if args.diffusion:
        try:
            from sglang_entropy_ccd.model import TrainConfig, ensure_model
        except ImportError:
            print("--diffusion needs the CCD plugin: pip install plugins/sglang-entropy-ccd", file=sys.stderr)
            return 2
        print(ensure_model(TrainConfig(steps=args.steps) if args.steps else TrainConfig(), force=args.force))
        return 0
    from sglang_entropy.model import build_default_model

    print(build_default_model(force=args.force))
    return 0


def cmd_demo(args) -> int:
    from sglang_entropy.demo import run_demo

    return run_demo(args)


def cmd_bench(args) -> int:
    from sglang_entropy.bench import run_overhead

    return run_overhead(args)


def plugin_bench(module: str, function: str, needs: str):
    """A ``bench`` subcommand that lives in a policy plugin: a clear error when it is not installed."""

    def run(args) -> int:
        try:
            bench = importlib.import_module(module)
        except ImportError:
            print(f"bench {args.bench} needs {needs}", file=sys.stderr)
            return 2
        return getattr(bench, function)(args)

    return run


cmd_bench_prune = plugin_bench(
    "sglang_entropy_prune.bench", "run_prune", "the prune plugin: pip install plugins/sglang-entropy-prune"
)
cmd_bench_branch = plugin_bench(
    "sglang_entropy_branch.bench",
    "run_branch",
    "the branch and prune plugins: pip install plugins/sglang-entropy-branch",
)
cmd_bench_ccd = plugin_bench(
    "sglang_entropy_ccd.bench", "run_ccd", "the CCD plugin: pip install plugins/sglang-entropy-ccd"
)
cmd_bench_taps = plugin_bench(
    "sglang_entropy_specroute.bench",
    "run_taps",
    "the speculative routing plugin: pip install plugins/sglang-entropy-specroute",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-entropy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed policies with version and parameters")
    p.add_argument("--json", action="store_true", help="print names, versions and JSON schemas")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("build-model", help="build the default model (SmolLM2-135M-Instruct) offline")
    p.add_argument("--force", action="store_true")
    p.add_argument(
        "--diffusion", action="store_true", help="train the small block-diffusion model for addition instead (CPU)"
    )
    p.add_argument("--steps", type=int, help="--diffusion: training steps (default 4000)")
    p.set_defaults(func=cmd_build_model)

    p = sub.add_parser("demo", help="launch SGLang with the adapter and show per-token entropy")
    p.add_argument("--model-path", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--plot", default="sglang-entropy-demo.png", help="where to write the PNG plot")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    bench = p.add_subparsers(dest="bench", required=True)
    o = bench.add_parser("overhead", help="decode throughput: signals on vs adapter disabled")
    o.add_argument("--model-path")
    o.add_argument("--batch-sizes", default="1,8,32")
    o.add_argument("--new-tokens", type=int, default=64)
    o.add_argument("--rounds", type=int, default=3)
    o.add_argument("--out", default="examples/results/overhead", help="path prefix of the .md and .json results")
    o.set_defaults(func=cmd_bench)
    r = bench.add_parser("prune", help="full sampling + voting vs DeepConf online (low, high): tokens, accuracy, time")
    r.add_argument("--url", help="an SGLang server running the deepconf policy (default: launch the default model)")
    r.add_argument("--model-path", help="model to launch (default: the embedded SmolLM2-135M-Instruct)")
    r.add_argument("--tokenizer", help="chat template source with --url (default: --model-path)")
    r.add_argument("--task", choices=("arith", "gsm8k"), default="arith")
    r.add_argument("--data", help="GSM8K-shaped JSONL for --task gsm8k")
    r.add_argument("--questions", type=int, default=30)
    r.add_argument("--budget", type=int, default=32, help="traces per question, the same in every arm")
    r.add_argument("--warmup", type=int, default=16, help="DeepConf warm-up traces")
    r.add_argument("--window", type=int, default=2048, help="DeepConf group-confidence window (tokens)")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--concurrency", type=int, default=2, help="questions in flight at once")
    r.add_argument("--seed", type=int, default=0, help="which questions")
    r.add_argument("--out", default="examples/results/prune", help="path prefix of the .md, .json and .png results")
    r.set_defaults(func=cmd_bench_prune)
    b = bench.add_parser("branch", help="full sampling vs EAGer vs EAGer-adapt: pass@k, majority, tokens, time")
    b.add_argument("--url")
    b.add_argument("--model-path")
    b.add_argument("--tokenizer")
    b.add_argument("--task", choices=("arith", "gsm8k"), default="arith")
    b.add_argument("--data")
    b.add_argument("--questions", type=int, default=30)
    b.add_argument("--max-sequences", type=int, default=8)
    b.add_argument("--threshold", type=float, default=2.4)
    b.add_argument("--adapt-share", type=float, default=0.5, help="EAGer-adapt budget per question, x max_sequences")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--temperature", type=float, default=0.6)
    b.add_argument("--concurrency", type=int, default=4)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="examples/results/branch")
    b.set_defaults(func=cmd_bench_branch)

    c = bench.add_parser("ccd", help="diffusion LM: LowConfidence vs CCD vs CCD + early exit: NFE, accuracy, time")
    c.add_argument(
        "--urls", help="four servers, in arm order (LowConfidence, one token per step, CCD, CCD + early exit)"
    )
    c.add_argument("--model-path", help="diffusion model to launch (default: the small addition model)")
    c.add_argument("--data", help="JSONL of {question, answer} instead of held-out addition problems")
    c.add_argument("--questions", type=int, default=200)
    c.add_argument("--block-size", type=int, default=8)
    c.add_argument("--threshold", type=float, default=0.95, help="LowConfidence's confidence threshold")
    c.add_argument("--budget", type=int, default=1, help="CCD's positions per step")
    c.add_argument("--exit-schedule", choices=("linear", "cosine", "exponential"), default="cosine")
    c.add_argument("--tau-high", type=float, default=6.0, help="early-exit logit margin at a block's first step")
    c.add_argument("--tau-low", type=float, default=2.0, help="... and at its last step")
    c.add_argument("--max-new-tokens", type=int, default=16)
    c.add_argument("--seed", type=int, default=7, help="which questions (training used seed 0)")
    c.add_argument("--out", default="examples/results/ccd_addition")
    c.set_defaults(func=cmd_bench_ccd)

    t = bench.add_parser(
        "taps", help="speculative decoding: each drafter alone vs confidence routing: acceptance, tokens/s, shares"
    )
    t.add_argument(
        "--urls", help="servers in arm order: target alone, each drafter alone, routing (default: launch them)"
    )
    t.add_argument("--model-path", help="target model (default: the embedded SmolLM2-135M-Instruct)")
    t.add_argument("--drafters", help="comma-separated drafter folders (default: the built math and chat drafters)")
    t.add_argument("--prompts", type=int, default=20, help="held-out prompts per domain (math, chat)")
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--num-steps", type=int, default=3, help="draft tokens per speculative step (chains)")
    t.add_argument("--confidence", choices=("token", "path"), default="token", help="taps' draft confidence")
    t.add_argument("--dtype", default="float32")
    t.add_argument("--out", default="examples/results/taps")
    t.set_defaults(func=cmd_bench_taps)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
