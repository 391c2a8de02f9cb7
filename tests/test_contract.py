import inspect
import json
import subprocess
import sys

import pluggy
import pytest
import torch

from sglang_entropy import hookspecs
from sglang_entropy.registry import PolicyRegistry, installed_policies, make_plugin_manager
from sglang_entropy.types import DecodeStep, PolicySpec


def test_every_hook_says_when_it_is_called_and_what_it_returns():
    hooks = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "sglang_entropy_spec")]
    assert {f.__name__ for f in hooks} >= {
        "register_policies",
        "init_state",
        "decode_step",
        "request_start",
        "request_end",
        "group_trace_finished",
        "group_vote",
        "unmask_step",
        "route_drafts",
    }
    for hook in hooks:
        doc = inspect.getdoc(hook) or ""
        assert "Called" in doc or "called" in doc, hook.__name__
        assert "Return" in doc, hook.__name__


def test_installed_policy_is_discovered_through_its_entry_point():
    policy = installed_policies().get("deepconf")
    assert policy.distribution == "sglang-entropy-prune"
    assert policy.version


def test_plugins_command_lists_policies_with_schema():
    out = subprocess.run(
        [sys.executable, "-m", "sglang_entropy.cli", "plugins", "--json"], capture_output=True, text=True, check=True
    ).stdout
    listed = {p["name"]: p for p in json.loads(out)}
    assert listed["deepconf"]["package"] == "sglang-entropy-prune"
    assert "threshold" in listed["deepconf"]["params"]["properties"]


def test_two_plugins_registering_one_name_is_an_error():
    hookimpl = pluggy.HookimplMarker("sglang_entropy")

    class Plugin:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def register_policies(self, register):
            register(PolicySpec(name=self.name, params=installed_policies().get("deepconf").spec.params))

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(Plugin("same"), name="a")
    manager.register(Plugin("same"), name="b")
    with pytest.raises(ValueError, match="registered twice"):
        PolicyRegistry(manager)


def test_deepconf_stops_only_on_a_full_window_below_threshold():
    from sglang_entropy_prune.policy import deepconf_stop

    step = DecodeStep(
        mask=torch.tensor([True, True, True, True]),
        slots=torch.tensor([1, 2, 3, 4]),
        token_index=torch.tensor([2, 3, 3, 10]),
        window_full=torch.tensor([False, True, True, True]),
        signals={"group_confidence": torch.tensor([1.0, 1.0, 5.0, 2.9])},
        params={"threshold": torch.tensor([3.0, 3.0, 3.0, 3.0]), "window_size": torch.tensor([4, 4, 4, 4])},
        state={},
        logits=torch.zeros(4, 8),
    )
    decision = deepconf_stop(step)
    # row 0: window not full yet; row 1: full and below; row 2: full, above; row 3: full, below
    assert decision.stop.tolist() == [False, True, False, True]
    assert decision.event_values["threshold"].tolist() == [3.0] * 4
