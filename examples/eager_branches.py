"""Ask one question under EAGer: the server forks a sequence wherever its top-K entropy exceeds
the threshold (up to max_sequences), reusing the shared prefix's KV cache; print every
sequence with where it branched off, its answer, and the majority vote.

    examples/launch_cpu.sh 30000 &          # a server with the adapter enabled
    python examples/eager_branches.py --url http://127.0.0.1:30000 "What is 3 + 4?"
"""

from __future__ import annotations

import argparse

import requests
from sglang_entropy_branch.client import majority, sequences
from sglang_entropy_prune.voting import extract_answer
from transformers import AutoTokenizer


def ask(url: str, tokenizer, question: str, threshold: float, max_sequences: int, max_tokens: int = 64):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    entropy = {"policy": "eager", "params": {"threshold": threshold, "max_sequences": max_sequences}}
    body = {
        "text": text,
        "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0.6, "custom_params": {"entropy": entropy}},
    }
    response = requests.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    return sequences(response.json(), tokenizer, extract_answer)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question")
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--tokenizer", help="HF folder or hub id (default: the server's model path)")
    parser.add_argument("--threshold", type=float, default=2.4)
    parser.add_argument("--max-sequences", type=int, default=8)
    args = parser.parse_args()
    model = args.tokenizer or requests.get(f"{args.url}/get_model_info", timeout=60).json()["model_path"]
    found = ask(args.url, AutoTokenizer.from_pretrained(model), args.question, args.threshold, args.max_sequences)
    for sequence in found:
        origin = (
            "root" if sequence.parent is None else f"from {sequence.parent[-4:]} at token {sequence.branch_token_index}"
        )
        print(f"[{sequence.rid[-4:]}] {origin}: {sequence.text!r} -> {sequence.answer}")
    print(f"{len(found)} sequences; majority answer: {majority([s.answer for s in found])}")


if __name__ == "__main__":
    main()
