"""Command line: ``sglang-entropy plugins | build-model | demo | bench``; plugins add their own
benchmarks and model builds (``register_commands``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from sglang_entropy.registry import make_plugin_manager
from sglang_entropy.tools.commands import Commands


def cmd_plugins(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from sglang_entropy.registry import installed_policies

    registry = installed_policies()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": p.spec.name,
                        "package": p.distribution,
                        "version": p.version,
                        "description": p.spec.description,
                        "params": p.spec.params.model_json_schema(),
                    }
                    for p in registry
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="Installed sglang-entropy policies")
    for column in ("policy", "package", "version", "parameters"):
        table.add_column(column)
    for p in registry:
        params = ", ".join(
            f"{name}: {info.annotation.__name__ if hasattr(info.annotation, '__name__') else info.annotation}"
            + ("" if info.is_required() else f" = {info.default!r}")
            for name, info in p.spec.params.model_fields.items()
        )
        table.add_row(p.spec.name, p.distribution or "?", p.version or "?", params)
    Console().print(table)
    if not registry.names():
        print("No policies installed: pip install a policy package, e.g. plugins/sglang-entropy-prune")
    return 0


def cmd_build_model(args) -> int:
    for dest, build in args.model_builders:
        if getattr(args, dest):
            print(build(args))
            return 0
    from sglang_entropy.tools.model import build_default_model, build_qwen_model

    if args.qwen:
        print(build_qwen_model(force=args.force))
        return 0

    print(build_default_model(force=args.force))
    return 0


def cmd_demo(args) -> int:
    from sglang_entropy.tools.demo import run_demo

    return run_demo(args)


def cmd_bench(args) -> int:
    from sglang_entropy.tools.bench import run_overhead

    return run_overhead(args)


def build_parser() -> argparse.ArgumentParser:
    """The command line, with every installed plugin's benchmarks, model builds and demo arms."""
    parser = argparse.ArgumentParser(prog="sglang-entropy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed policies with version and parameters")
    p.add_argument("--json", action="store_true", help="print names, versions and JSON schemas")
    p.set_defaults(func=cmd_plugins)

    build = sub.add_parser("build-model", help="build the default model (SmolLM2-135M-Instruct) offline")
    build.add_argument("--force", action="store_true")
    build.add_argument(
        "--qwen",
        action="store_true",
        help="build Qwen2.5-Coder-0.5B-Instruct for accuracy benchmarks instead (456 MB download, 1.26 GB)",
    )
    build.set_defaults(func=cmd_build_model)

    demo = sub.add_parser(
        "demo", help="launch SGLang with the adapter, show per-token entropy and what the policies save"
    )
    demo.add_argument("--model-path", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--plot", default="sglang-entropy-demo.png", help="where to write the PNG plot")
    demo.add_argument("--questions", type=int, default=8, help="questions of the side-by-side (0: skip it)")
    demo.add_argument("--sequences", type=int, default=8, help="sequences per question in every arm")
    demo.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    bench = p.add_subparsers(dest="bench", required=True)
    o = bench.add_parser("overhead", help="decode throughput: signals on vs adapter disabled")
    o.add_argument("--model-path")
    o.add_argument("--batch-sizes", default="1,8,32")
    o.add_argument("--new-tokens", type=int, default=64)
    o.add_argument("--rounds", type=int, default=3)
    o.add_argument("--out", default="examples/results/overhead", help="path prefix of the .md and .json results")
    o.add_argument("--policy", help="a third arm: signals and this policy (e.g. deepconf)")
    o.add_argument("--policy-params", help="JSON parameters of --policy, e.g. '{\"threshold\": 0.0}'")
    o.set_defaults(func=cmd_bench)
    commands = Commands(bench, build)
    make_plugin_manager().hook.register_commands(commands=commands)
    build.set_defaults(model_builders=commands.model_builders)
    demo.set_defaults(demo_arms=commands.demo_arms)
    return parser


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    # `kill` ends a command as Ctrl-C does: a bench keeps its rows and report, a launched server stops.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        import matplotlib  # noqa: F401
        import rich  # noqa: F401
    except ImportError as e:
        needs = f"the sglang-entropy command needs its tools ({e.name})"
        raise SystemExit(f"{needs}: pip install 'sglang-entropy[tools]'") from None
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
