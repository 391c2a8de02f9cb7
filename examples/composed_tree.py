"""Ask one question under two policies at once: eager grows a tree (forks where a sequence's
top-K entropy exceeds its threshold) and deepconf prunes every sequence whose whole-trace group
confidence falls below a threshold. Warm-up traces set that threshold first, as DeepConf-low
does; print the tree (each sequence with its parent, branch point and, if pruned, where), and
the confidence-weighted vote of the sequences that were not pruned.

    examples/launch_cpu.sh 30000 &          # a server with the adapter enabled
    python examples/composed_tree.py --url http://127.0.0.1:30000 "What is 7 times 8?"
"""

from __future__ import annotations

import argparse

import requests
from sglang_entropy_branch.client import sequences
from sglang_entropy_prune.voting import Trace, calibrated_threshold, extract_answer, lowest_group_confidence, vote
from transformers import AutoTokenizer


def generate(url: str, text: str, sampling: dict) -> list[dict]:
    response = requests.post(f"{url}/generate", json={"text": text, "sampling_params": sampling}, timeout=600)
    response.raise_for_status()
    outputs = response.json()
    return outputs if isinstance(outputs, list) else [outputs]


def ask(url, tokenizer, question, warmup=2, max_sequences=6, window=8, eager_threshold=2.0, max_tokens=48):
    """(threshold, sequences, pruned, vote): warm-up traces calibrate the threshold, then one
    composed request grows the tree."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    sampling = {"max_new_tokens": max_tokens, "temperature": 0.7}
    confidence = {"return_signals": ["confidence"]}
    traces = generate(url, text, {**sampling, "n": warmup, "custom_params": {"entropy": confidence}})
    lowest = [lowest_group_confidence(t["meta_info"]["entropy"]["signals"]["confidence"], window) for t in traces]
    threshold = calibrated_threshold(lowest, 90)
    policies = [
        {"policy": "eager", "params": {"threshold": eager_threshold, "max_sequences": max_sequences}},
        {"policy": "deepconf", "params": {"threshold": threshold, "window_size": window}},
    ]
    outputs = generate(url, text, {**sampling, "custom_params": {"entropy": {**confidence, "policies": policies}}})
    found = sequences(outputs, tokenizer, extract_answer)
    pruned = {
        o["meta_info"]["id"]: o["meta_info"]["finish_reason"].get("token_index")
        for o in outputs
        if (o["meta_info"]["finish_reason"] or {}).get("entropy_policy") == "deepconf"
    }
    ballots = [Trace(s.text, [], s.rid in pruned) for s in found]  # unweighted: the tree's own sequences
    return threshold, found, pruned, vote(ballots, "auto", window)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question")
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--tokenizer", help="HF folder or hub id (default: the server's model path)")
    parser.add_argument("--max-sequences", type=int, default=6)
    args = parser.parse_args()
    model = args.tokenizer or requests.get(f"{args.url}/get_model_info", timeout=60).json()["model_path"]
    threshold, found, pruned, result = ask(
        args.url, AutoTokenizer.from_pretrained(model), args.question, max_sequences=args.max_sequences
    )
    print(f"deepconf threshold from the warm-up traces: {threshold:.3f}")
    for s in found:
        origin = "root" if s.parent is None else f"from {s.parent[-4:]} at token {s.branch_token_index}"
        end = f"pruned at its token {pruned[s.rid]}" if s.rid in pruned else f"answer {s.answer}"
        print(f"[{s.rid[-4:]}] {origin}: {s.text!r} -> {end}")
    print(f"{len(found)} sequences, {len(pruned)} pruned; majority of the rest: {result.majority}")


if __name__ == "__main__":
    main()
