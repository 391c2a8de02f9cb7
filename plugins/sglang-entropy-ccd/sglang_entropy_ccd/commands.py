"""The CCD plugin's ``sglang-entropy`` subcommands (entry point in ``sglang_entropy.policies``):
``bench ccd`` and ``build-model --diffusion``."""

from __future__ import annotations

from sglang_entropy import hookimpl


def _run(args) -> int:
    from sglang_entropy_ccd.bench import run_ccd

    return run_ccd(args)


def _build(args):
    from sglang_entropy_ccd.model import TrainConfig, ensure_model

    return ensure_model(TrainConfig(steps=args.steps) if args.steps else TrainConfig(), force=args.force)


def _build_long(args):
    import dataclasses

    from sglang_entropy_ccd.model import LONG_CONFIG, ensure_model

    config = dataclasses.replace(LONG_CONFIG, steps=args.steps) if args.steps else LONG_CONFIG
    return ensure_model(config, force=args.force)


def _run_pareto(args) -> int:
    from sglang_entropy_ccd.pareto import run_pareto

    return run_pareto(args)


def _pair(text: str) -> tuple[float, float]:
    high, low = text.split(":")
    return float(high), float(low)


@hookimpl
def register_commands(commands):
    build = commands.add_model(
        "--diffusion", "train the small block-diffusion model for addition instead (CPU)", _build
    )
    commands.add_model(
        "--diffusion-long",
        "train the block-diffusion model for arithmetic progressions (answers over 5 blocks of 16) instead (CPU)",
        _build_long,
    )
    build.add_argument(
        "--steps",
        type=int,
        help="--diffusion, --diffusion-long: training steps (default 4000, 2400); "
        "another count builds a separate model (e.g. sdar-progression-600steps)",
    )
    c = commands.add_bench("ccd", help="diffusion LM: LowConfidence vs CCD vs CCD + early exit: NFE, accuracy, time")
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
    c.set_defaults(func=_run)
    p = commands.add_bench(
        "ccd-pareto",
        help="diffusion LM: accuracy against forwards per token for one token per step, LowConfidence, "
        "JointThreshold, CCD and CCD + early exit (the progression model)",
    )
    p.add_argument("--model-path", help="diffusion model (default: build-model --diffusion-long's)")
    p.add_argument(
        "--model-steps", type=int, help="the progression model trained for this many steps (built if missing)"
    )
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--seed", type=int, default=7, help="which held-out problems")
    p.add_argument("--block-size", type=int, help="default: the block size the model was trained with")
    p.add_argument("--max-new-tokens", type=int, help="default: up to the model's context length")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.9, 0.7, 0.5], help="LowConfidence's")
    p.add_argument("--joint-thresholds", type=float, nargs="+", default=[0.9, 0.5], help="JointThreshold's")
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 2], help="CCD's")
    p.add_argument("--expand-ratios", type=float, nargs="+", default=[4.0], help="CCD's")
    p.add_argument("--exit-schedule", choices=("linear", "cosine", "exponential"), default="cosine")
    p.add_argument(
        "--taus",
        type=_pair,
        nargs="+",
        default=[(8.0, 4.0), (6.0, 2.0), (4.0, 1.0), (3.0, 0.5)],
        help="CCD + early exit: HIGH:LOW thresholds of the exit schedule",
    )
    p.add_argument("--out", default="examples/results/ccd_pareto")
    p.set_defaults(func=_run_pareto)
