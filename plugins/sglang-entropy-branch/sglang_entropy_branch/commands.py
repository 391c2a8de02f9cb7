"""The branch plugin's ``sglang-entropy`` subcommands (entry point in ``sglang_entropy.policies``)."""

from __future__ import annotations

from sglang_entropy import hookimpl
from sglang_entropy.tools.commands import DemoArm
from sglang_entropy.tools.runner import add_common_flags


def _run(args) -> int:
    from sglang_entropy_branch.bench import run_branch

    return run_branch(args)


@hookimpl
def register_commands(commands):
    b = commands.add_bench("branch", help="full sampling vs EAGer vs EAGer-adapt: pass@k, majority, tokens, time")
    add_common_flags(
        b, tasks=("arith", "mult", "add2", "gsm8k"), questions=30, out="examples/results/branch", temperature=0.6
    )
    b.add_argument("--max-sequences", type=int, default=8)
    b.add_argument("--threshold", type=float, default=2.4)
    b.add_argument("--adapt-share", type=float, default=0.5, help="EAGer-adapt budget per question, x max_sequences")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.set_defaults(func=_run)
    t = commands.add_bench(
        "tree",
        help="full sampling vs DeepConf-low vs EAGer vs EAGer-adapt vs eager + deepconf trees, on one budget",
    )
    add_common_flags(t, tasks=("mult", "add2", "arith", "gsm8k"), questions=100, out="examples/results/tree_mult")
    t.add_argument("--budget", type=int, default=8, help="M: sequences per question in every arm")
    t.add_argument("--warmup", type=int, default=2, help="DeepConf warm-up traces (of M) that set the threshold")
    t.add_argument("--window", type=int, default=8, help="group-confidence window, tokens")
    t.add_argument("--eager-threshold", type=float, default=2.0, help="fork where the top-K entropy exceeds this")
    t.add_argument("--adapt-share", type=float, default=0.5, help="budgets: this x the sequences per question")
    t.add_argument("--max-new-tokens", type=int, default=32)
    t.add_argument(
        "--arms",
        help="comma-separated arms to run, of full, deepconf-low, deepconf-high, eager, eager-adapt, tree, "
        "tree-budget (default: all; full always; more can join the same rows later)",
    )
    t.set_defaults(func=_run_tree)
    commands.add_demo_arm(DemoArm("EAGer tree", "eager", eager_tree))


def _run_tree(args) -> int:
    from sglang_entropy_branch.tree_bench import run_tree

    return run_tree(args)


def eager_tree(url, prompt, sequences, sampling, tokenizer):
    """EAGer: one sequence that forks where its top-K entropy passes the default threshold,
    up to ``sequences`` in all; every sequence votes with its whole text."""
    import requests

    from sglang_entropy.tools.commands import DemoAnswer
    from sglang_entropy_branch.client import sequences as whole_sequences

    entropy = {"policy": "eager", "params": {"max_sequences": sequences}}
    body = {"text": prompt, "sampling_params": {**sampling, "custom_params": {"entropy": entropy}}}
    response = requests.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    outputs = response.json()
    texts = [s.text for s in whole_sequences(outputs, tokenizer, lambda text: None)]
    return DemoAnswer(texts, sum(o["meta_info"]["completion_tokens"] for o in outputs))
