"""``sglang-entropy bench taps``: each drafter alone vs confidence routing, side by side, per domain.

Arms (one SGLang server each, the same target, speculative settings and prompts):

* the target alone, without speculation (the speed reference);
* each drafter alone: SGLang's own STANDALONE speculative decoding with that drafter;
* routing: the server holds every drafter (``--entropy-drafters``) and the ``taps`` policy sends
  the most confident drafter's chain to the target at each step.

Prompts come from two domains, held out from the drafters' training (the ``bench`` split of
``drafters.domain_prompts``): GSM8K questions read from ``../shared/data`` and templated chat
prompts. Every prompt goes to every arm in turn (the order rotates per prompt), greedy, one
request at a time. Acceptance length is tokens committed per verification step (the target's
bonus token included): (completion tokens - 1) / ``spec_verify_ct``, the first token coming from
the prefill. Wall times on CPU are reported as ratios to the target alone.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import requests

from sglang_entropy.tools.commands import bench_command, without_paths
from sglang_entropy.tools.model import card_text, model_card
from sglang_entropy.tools.server import standalone_args
from sglang_entropy_specroute.drafters import DOMAINS, default_drafters_dir, domain_prompts, prompt_ids

TARGET_ALONE = "target alone"
ROUTING = "taps routing"


def drafter_paths(args) -> list[Path]:
    if args.drafters:
        paths = [Path(p) for p in args.drafters.split(",")]
    else:
        paths = [default_drafters_dir() / domain for domain in DOMAINS]
    missing = [str(p) for p in paths if not (p / "config.json").exists()]
    if missing:
        raise SystemExit(f"no drafter at {', '.join(missing)}: build them with `sglang-entropy-drafters` (CPU, ~1 h)")
    return paths


def arms(args, drafters: list[Path]) -> list[tuple[str, list[str]]]:
    """(label, extra server args) of each arm."""
    common = ["--page-size", "1", "--dtype", args.dtype, "--max-total-tokens", "8192"]
    single = [(f"{d.name} drafter alone", common + standalone_args(d, args.num_steps)) for d in drafters]
    routing = common + standalone_args(drafters[0], args.num_steps, drafters)
    return [(TARGET_ALONE, common), *single, (ROUTING, routing)]


def bench_prompts(tokenizer, per_domain: int) -> list[tuple[str, list[int]]]:
    """(domain, chat-templated prompt ids), domains interleaved so a cut-short run stays mixed."""
    by_domain = {d: [prompt_ids(tokenizer, p) for p in domain_prompts(d, "bench", per_domain)] for d in DOMAINS}
    return [(d, by_domain[d][i]) for i in range(per_domain) for d in DOMAINS]


def generate(url: str, ids: list[int], max_new_tokens: int, custom: dict | None) -> tuple[dict, float]:
    sampling = {"temperature": 0, "max_new_tokens": max_new_tokens}
    if custom:
        sampling["custom_params"] = custom
    started = time.perf_counter()
    response = requests.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": sampling}, timeout=900)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return response.json(), time.perf_counter() - started


def run_taps(args) -> int:
    from rich.progress import track
    from transformers import AutoTokenizer

    from sglang_entropy.tools.model import build_default_model
    from sglang_entropy.tools.server import launch

    target = Path(args.model_path) if args.model_path else build_default_model()
    drafters = drafter_paths(args)
    arm_list = arms(args, drafters)
    labels = [label for label, _ in arm_list]
    urls = dict(zip(labels, args.urls.split(","), strict=True)) if args.urls else {}
    prompts = bench_prompts(AutoTokenizer.from_pretrained(target), args.prompts)
    custom = {"entropy": {"policy": "taps", "params": {"confidence": args.confidence}}}
    rows = []
    with ExitStack() as stack:
        for label, extra in arm_list:
            if label not in urls:
                print(f"launching {label}")
                urls[label] = stack.enter_context(launch(target, enable_entropy=False, extra_args=extra)).url
        for index, (domain, ids) in enumerate(track(prompts, description="prompts")):
            shift = index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                out, seconds = generate(urls[label], ids, args.max_new_tokens, custom if label == ROUTING else None)
                meta = out["meta_info"]
                routes = [e for e in (meta.get("entropy") or {}).get("events", []) if e.get("kind") == "route"]
                rows.append(
                    {
                        "prompt": index,
                        "domain": domain,
                        "arm": label,
                        "output_ids": out["output_ids"],
                        "tokens": meta["completion_tokens"],
                        "verify_steps": meta.get("spec_verify_ct", 0),
                        "seconds": seconds,
                        "routes": [e["drafter_name"] for e in routes],
                        "routes_to_most_confident": all(
                            e["confidences"][e["drafter"]] == max(c for c in e["confidences"] if c is not None)
                            for e in routes
                        ),
                    }
                )
    summary = summarize(rows, labels, [d.name for d in drafters])
    command = bench_command("taps")
    meta = {
        "command": command,
        "target": model_card(target),
        "drafters": [model_card(d) for d in drafters],
        "arms": [(name, without_paths(flags)) for name, flags in arm_list],
        "prompts_per_domain": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "greedy_outputs_identical_to_target": identical_outputs(rows),
    }
    write_report(Path(args.out), meta, summary, rows)
    for line in table(summary):
        print(line)
    return 0


def identical_outputs(rows: list[dict]) -> dict[str, float]:
    """Per arm: the share of prompts whose greedy output equals the target-alone output."""
    reference = {r["prompt"]: r["output_ids"] for r in rows if r["arm"] == TARGET_ALONE}
    shares = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        shares[arm] = sum(r["output_ids"] == reference[r["prompt"]] for r in mine) / len(mine)
    return shares


def summarize(rows: list[dict], labels: list[str], drafter_names: list[str]) -> list[dict]:
    """One entry per (arm, domain), the mixed workload included."""
    summary = []
    for domain in (*DOMAINS, "mixed"):
        in_domain = [r for r in rows if domain == "mixed" or r["domain"] == domain]
        base = [r for r in in_domain if r["arm"] == TARGET_ALONE]
        base_rate = sum(r["tokens"] for r in base) / sum(r["seconds"] for r in base)
        for label in labels:
            arm = [r for r in in_domain if r["arm"] == label]
            steps = sum(r["verify_steps"] for r in arm)
            rate = sum(r["tokens"] for r in arm) / sum(r["seconds"] for r in arm)
            routes = [name for r in arm for name in r["routes"]]
            summary.append(
                {
                    "arm": label,
                    "domain": domain,
                    "prompts": len(arm),
                    "tokens": sum(r["tokens"] for r in arm),
                    "acceptance_length": sum(r["tokens"] - 1 for r in arm) / steps if steps else None,
                    "tokens_per_s_vs_target": rate / base_rate,
                    "route_share": {n: routes.count(n) / len(routes) for n in drafter_names} if routes else None,
                    "routes_to_most_confident": all(r["routes_to_most_confident"] for r in arm),
                }
            )
    return summary


def table(summary: list[dict]) -> list[str]:
    lines = [
        "| domain | arm | acceptance length | tokens/s vs target alone | share of steps routed to each drafter |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        accept = "-" if s["acceptance_length"] is None else f"{s['acceptance_length']:.2f}"
        share = ", ".join(f"{n} {v:.0%}" for n, v in s["route_share"].items()) if s["route_share"] else "-"
        lines.append(f"| {s['domain']} | {s['arm']} | {accept} | {s['tokens_per_s_vs_target']:.2f}x | {share} |")
    return lines


def write_report(out: Path, meta: dict, summary: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}) + "\n")
    identical = ", ".join(f"{arm} {share:.0%}" for arm, share in meta["greedy_outputs_identical_to_target"].items())
    text = [
        "# Speculative-draft routing by confidence (taps) vs each drafter alone",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Target {card_text(meta['target'])}; drafters {', '.join(card_text(d) for d in meta['drafters'])}. "
        f"{meta['prompts_per_domain']} held-out prompts per domain, greedy, at most {meta['max_new_tokens']} "
        "new tokens, one request at a time, each prompt sent to every arm in turn.",
        "",
        *table(summary),
        "",
        "Acceptance length: tokens committed per verification step, the target's bonus token included. "
        "Tokens/s are ratios to the target alone, measured in the same run on the same machine. "
        f"Greedy outputs identical to the target alone: {identical}. Every route event names the drafter "
        f"with the highest reported confidence: {all(s['routes_to_most_confident'] for s in summary)}.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(text))

    domains = list(dict.fromkeys(s["domain"] for s in summary))
    spec_arms = [a for a in dict.fromkeys(s["arm"] for s in summary) if a != TARGET_ALONE]
    cell = {(s["arm"], s["domain"]): s for s in summary}
    fig, (ax_accept, ax_speed, ax_share) = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(spec_arms)
    for i, arm in enumerate(spec_arms):
        xs = [d + (i - (len(spec_arms) - 1) / 2) * width for d in range(len(domains))]
        ax_accept.bar(xs, [cell[(arm, d)]["acceptance_length"] for d in domains], width, label=arm)
        ax_speed.bar(xs, [cell[(arm, d)]["tokens_per_s_vs_target"] for d in domains], width, label=arm)
    ax_accept.set_ylabel("acceptance length (tokens / step)")
    ax_speed.set_ylabel("tokens/s vs target alone")
    ax_speed.axhline(1.0, color="#888888", linestyle=":", linewidth=1)
    names = list(cell[(ROUTING, domains[0])]["route_share"] or {})
    bottom = [0.0] * len(domains)
    for name in names:
        share = [(cell[(ROUTING, d)]["route_share"] or {}).get(name, 0.0) for d in domains]
        ax_share.bar(domains, share, bottom=bottom, label=f"{name} drafter")
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    ax_share.set_ylabel("share of routed steps")
    ax_share.set_ylim(0, 1)
    for ax in (ax_accept, ax_speed):
        ax.set_xticks(range(len(domains)), domains)
    ax_accept.legend(fontsize=8)
    ax_share.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
