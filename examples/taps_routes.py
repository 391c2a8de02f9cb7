"""Ask through the OpenAI API on a server with several drafters; print, per speculative step,
which drafter taps routed to, every drafter's confidence, and how many tokens the step committed.

    examples/launch_taps_cpu.sh 30000 &
    python examples/taps_routes.py --url http://127.0.0.1:30000 "Tom has 3 apples and buys 5 more. How many?"
"""

from __future__ import annotations

import argparse

import openai


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question")
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--granularity", choices=("step", "request"), default="step")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="none")
    entropy = {"policy": "taps", "params": {"granularity": args.granularity}}
    reply = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": args.question}],
        max_tokens=args.max_tokens,
        temperature=0,  # verification is greedy on the CPU platform
        extra_body={"custom_params": {"entropy": entropy}},
    )
    print(reply.choices[0].message.content)
    info = reply.metadata["entropy"][0]
    routes = [e for e in info["events"] if e["kind"] == "route"]
    for step, event in enumerate(routes):
        confidences = ", ".join(f"{c:.2f}" for c in event["confidences"])
        print(f"step {step:3d}: {event['drafter_name']:>8} (confidences {confidences}) +{event['accepted']} tokens")
    print(f"acceptance length {info['acceptance_length']:.2f} tokens per step")


if __name__ == "__main__":
    main()
