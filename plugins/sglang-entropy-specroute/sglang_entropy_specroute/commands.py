"""The specroute plugin's ``sglang-entropy`` subcommands (entry point in ``sglang_entropy.policies``)."""

from __future__ import annotations

from sglang_entropy import hookimpl


def _run(args) -> int:
    from sglang_entropy_specroute.bench import run_taps

    return run_taps(args)


@hookimpl
def register_commands(commands):
    t = commands.add_bench(
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
    t.set_defaults(func=_run)
