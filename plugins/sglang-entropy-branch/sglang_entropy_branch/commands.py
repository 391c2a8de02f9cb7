"""The branch plugin's ``sglang-entropy`` subcommands (entry point in ``sglang_entropy.policies``)."""

from __future__ import annotations

from sglang_entropy import hookimpl
from sglang_entropy.tools.commands import DemoArm


def _run(args) -> int:
    from sglang_entropy_branch.bench import run_branch

    return run_branch(args)


@hookimpl
def register_commands(commands):
    b = commands.add_bench("branch", help="full sampling vs EAGer vs EAGer-adapt: pass@k, majority, tokens, time")
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
    b.set_defaults(func=_run)
    commands.add_demo_arm(DemoArm("EAGer tree", "eager", eager_tree))


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
