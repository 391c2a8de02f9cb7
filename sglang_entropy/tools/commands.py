"""What plugins see of the ``sglang-entropy`` command (``register_commands`` in the contract)."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PATH_FLAGS = (
    "--model-path",
    "--tokenizer",
    "--data",
    "--drafters",
    "--drafter",
    "--traces-file",
    "--speculative-draft-model-path",
    "--entropy-drafters",
)


def bench_command(name: str) -> str:
    """The ``sglang-entropy bench ...`` command line this process runs, as recorded in results
    (``sglang-entropy bench NAME`` when the bench was called from Python, not the CLI). Paths
    given to ``PATH_FLAGS`` are written as ``<name>`` (their last part): results name models and
    data by name and checksum, never by a local path."""
    if "bench" not in sys.argv:
        return f"sglang-entropy bench {name}"
    return "sglang-entropy bench " + command_line(without_paths(sys.argv[sys.argv.index("bench") + 1 :]))


def command_line(argv: list[str]) -> str:
    """``argv`` quoted for a shell, but for the ``<name>`` placeholders of ``without_paths``."""
    return " ".join(a if a.startswith("<") or "=<" in a else shlex.quote(a) for a in argv)


def _named(value: str) -> str:
    return ",".join(f"<{Path(part).name}>" for part in value.split(","))


def without_paths(argv: list[str]) -> list[str]:
    """``argv`` with each value of a ``PATH_FLAGS`` flag replaced by ``<its name>``."""
    result, after_flag = [], False
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if after_flag:
            result.append(_named(arg))
        elif equals and flag in PATH_FLAGS:
            result.append(f"{flag}={_named(value)}")
        else:
            result.append(arg)
        after_flag = arg in PATH_FLAGS
    return result


@dataclass(frozen=True)
class DemoAnswer:
    """A demo arm's answer to one question: the texts of the sequences that vote (each whole,
    from the first output token) and the tokens the server generated for the question."""

    texts: list[str]
    tokens: int


@dataclass(frozen=True)
class DemoArm:
    """One policy's arm of the demo's side-by-side against full sampling.

    ``ask(url, prompt, sequences, sampling, tokenizer)`` answers one chat-formatted prompt with
    at most ``sequences`` sequences, sampling with ``sampling`` (``max_new_tokens``,
    ``temperature``), on a server that enables ``policy``; returns a ``DemoAnswer``."""

    name: str
    policy: str
    ask: Callable[..., DemoAnswer]


class Commands:
    """Handed to each plugin's ``register_commands``: adds its benchmarks, model builds and
    demo arms."""

    def __init__(self, benches, build_model: argparse.ArgumentParser):
        self._benches = benches  # the subparsers of ``sglang-entropy bench``
        self.build_model = build_model
        self.model_builders: list[tuple[str, Callable]] = []  # (args attribute, build)
        self.demo_arms: list[DemoArm] = []

    def add_bench(self, name: str, help: str) -> argparse.ArgumentParser:
        """The parser of ``sglang-entropy bench NAME``; set ``func=run`` on it."""
        return self._benches.add_parser(name, help=help)

    def add_model(self, flag: str, help: str, build: Callable) -> argparse.ArgumentParser:
        """``sglang-entropy build-model FLAG`` builds with ``build(args)`` (returns the model's
        path) instead of the default model; returns the ``build-model`` parser for more options."""
        action = self.build_model.add_argument(flag, action="store_true", help=help)
        self.model_builders.append((action.dest, build))
        return self.build_model

    def add_demo_arm(self, arm: DemoArm) -> None:
        """``sglang-entropy demo`` runs ``arm`` next to full sampling on the same questions."""
        self.demo_arms.append(arm)
