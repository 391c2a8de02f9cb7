"""Launch flags on SGLang's own launchers (``sglang serve``, ``python -m sglang.launch_server``).

ServerArgs is a dataclass that drops unknown arguments, so each flag acts while it is parsed:
it sets its environment variable, which SGLang's subprocesses inherit.
"""

from __future__ import annotations

import argparse
import os

from sglang_entropy.adapter.activation import activate
from sglang_entropy.settings import (
    ENV_CONFIG,
    ENV_DRAFTERS,
    ENV_POLICIES,
    ServerConfig,
    ServerSettings,
    load_config,
    parse_drafters,
)


class _EnableAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        activate()


class _EnvAction(argparse.Action):
    """Sets the flag's environment variable once its value is checked (a bad value ends the
    launch here, before the model loads)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from sglang_entropy.registry import installed_policies

        if self.dest == "entropy_config":
            values = os.path.abspath(values)
            settings = ServerSettings(enabled=True, allowed_policies=None, config=_config_or_error(parser, values))
        else:
            names = tuple(n.strip() for n in values.split(",") if n.strip())
            settings = ServerSettings(enabled=True, allowed_policies=names, config=ServerConfig())
        try:
            settings.check(installed_policies())
        except ValueError as e:
            parser.error(str(e))
        os.environ[ENV_CONFIG if self.dest == "entropy_config" else ENV_POLICIES] = values
        setattr(namespace, self.dest, values)


def _config_or_error(parser, path: str) -> ServerConfig:
    try:
        return load_config(path)
    except ValueError as e:
        parser.error(str(e))


class _DraftersAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        drafters = parse_drafters(values)
        if len(drafters) < 2:
            parser.error(f"--entropy-drafters needs two or more comma-separated model paths (got {values!r})")
        os.environ[ENV_DRAFTERS] = ",".join(drafters)
        setattr(namespace, self.dest, values)
        activate()  # the routing policies and their per-step events live in the adapter


def add_flags(result, parser: argparse.ArgumentParser):
    group = parser.add_argument_group("sglang-entropy (uncertainty-aware decoding policies)")
    group.add_argument(
        "--enable-entropy",
        nargs=0,
        action=_EnableAction,
        help="Compute uncertainty signals and run entropy policies (env: SGLANG_ENTROPY_ENABLE=1).",
    )
    group.add_argument(
        "--entropy-policies",
        action=_EnvAction,
        metavar="NAME[,NAME]",
        help="Policies that requests may select (default: every installed one; env: SGLANG_ENTROPY_POLICIES).",
    )
    group.add_argument(
        "--entropy-config",
        action=_EnvAction,
        metavar="FILE",
        help="JSON or TOML file with signal settings and default parameters per policy (env: SGLANG_ENTROPY_CONFIG).",
    )
    group.add_argument(
        "--entropy-drafters",
        action=_DraftersAction,
        metavar="PATH,PATH[,PATH]",
        help="Drafter models for STANDALONE speculative decoding; a routing policy picks one per request and step "
        "(the first must equal --speculative-draft-model-path; env: SGLANG_ENTROPY_DRAFTERS).",
    )
    return result
