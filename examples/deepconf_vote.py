"""An SGLang frontend program: answer a question with a budget of traces under DeepConf online,
then vote (majority, confidence-weighted, top-10% filtered).

The traces are forks of one program; they share a ``group_id``, so the server runs the first
``warmup_traces`` in full, calibrates the threshold from them, and prunes the rest online.

    python -m sglang.launch_server --model-path ~/.cache/sglang-entropy/SmolLM2-135M-Instruct \
        --enable-entropy ...            # see launch_cpu.sh / launch_gpu.sh
    python examples/deepconf_vote.py --url http://127.0.0.1:30000 "What is 3 + 4?"
"""

from __future__ import annotations

import argparse
import uuid

import sglang as sgl
from sglang.lang.chat_template import get_chat_template
from sglang_entropy_prune.voting import traces_from_outputs, vote

from sglang_entropy.tools.client import EntropyEndpoint


@sgl.function
def deepconf_traces(s, question, budget, max_tokens, entropy):
    s += sgl.user(question)
    forks = s.fork(budget)
    forks += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0.7))
    s.set_var("traces", [{"text": f["answer"], "meta_info": f.get_meta_info("answer")} for f in forks])


def answer(question: str, budget: int = 16, warmup: int = 4, window: int = 16, max_tokens: int = 64, **params):
    """Run the program on the default backend; returns the vote and the traces."""
    entropy = {
        "policy": "deepconf",
        "params": {"group_id": uuid.uuid4().hex, "warmup_traces": warmup, "window_size": window, **params},
        "return_signals": ["confidence"],
    }
    state = deepconf_traces.run(question=question, budget=budget, max_tokens=max_tokens, entropy=entropy)
    traces = state.get_var("traces")
    return vote(traces_from_outputs(traces), window=window), traces


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question")
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--percentile", type=float, default=90, help="90: DeepConf-low, 10: DeepConf-high")
    args = parser.parse_args()
    backend = EntropyEndpoint(args.url)
    backend.chat_template = get_chat_template("chatml")  # SmolLM2's template
    sgl.set_default_backend(backend)
    result, traces = answer(args.question, args.budget, args.warmup, percentile=args.percentile)
    stopped = sum("entropy_policy" in t["meta_info"]["finish_reason"] for t in traces)
    tokens = sum(t["meta_info"]["completion_tokens"] for t in traces)
    print(f"{len(traces)} traces, {stopped} stopped early, {tokens} tokens")
    print(f"majority: {result.majority}  weighted: {result.weighted}  top-10%: {result.filtered}")
    print(f"weighted support {result.weighted_support:.2f} from {result.voters} votes: {result.tallies}")


if __name__ == "__main__":
    main()
