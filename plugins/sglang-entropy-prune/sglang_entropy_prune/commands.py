"""The prune plugin's ``sglang-entropy`` subcommands (entry point in ``sglang_entropy.policies``)."""

from __future__ import annotations

from sglang_entropy import hookimpl
from sglang_entropy.tools.commands import DemoArm
from sglang_entropy.tools.runner import add_common_flags


def _run(args) -> int:
    from sglang_entropy_prune.bench import run_prune

    return run_prune(args)


@hookimpl
def register_commands(commands):
    r = commands.add_bench(
        "prune", help="full sampling + voting vs DeepConf online (low, high): tokens, accuracy, time"
    )
    add_common_flags(
        r, tasks=("arith", "mult", "add2", "gsm8k"), questions=30, out="examples/results/prune", concurrency=2
    )
    r.add_argument("--budget", type=int, default=32, help="traces per question, the same in every arm")
    r.add_argument("--warmup", type=int, default=16, help="DeepConf warm-up traces")
    r.add_argument("--window", type=int, default=2048, help="DeepConf group-confidence window (tokens)")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.set_defaults(func=_run)
    commands.add_demo_arm(DemoArm("DeepConf-low", "deepconf", deepconf_low))


def deepconf_low(url, prompt, sequences, sampling, tokenizer):
    """DeepConf-low online: a quarter of the traces warm up, the rest are pruned below the
    90th percentile of the warm-up traces' lowest group confidence; the unpruned ones vote."""
    import requests

    from sglang_entropy.tools.commands import DemoAnswer
    from sglang_entropy_prune.voting import traces_from_outputs

    params = {"warmup_traces": max(1, sequences // 4), "percentile": 90, "window_size": 8}
    entropy = {"policy": "deepconf", "params": params, "return_signals": ["confidence"]}
    body = {"text": prompt, "sampling_params": {**sampling, "n": sequences, "custom_params": {"entropy": entropy}}}
    response = requests.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    outputs = response.json()
    voting = [t.text for t in traces_from_outputs(outputs) if not t.stopped_early]
    return DemoAnswer(voting, sum(o["meta_info"]["completion_tokens"] for o in outputs))
