import inspect
import json
import subprocess
import sys
from types import SimpleNamespace

import pluggy
import pytest
import torch

from sglang_entropy import hookspecs
from sglang_entropy.registry import PolicyRegistry, installed_policies, make_plugin_manager
from sglang_entropy.types import DecodeStep, PolicyParams, PolicySpec


def test_every_hook_and_policy_method_says_when_it_is_called_and_what_it_returns():
    hooks = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "sglang_entropy_spec")]
    assert {f.__name__ for f in hooks} == {"register_policies", "register_commands"}
    methods = {
        name: method
        for interface in hookspecs.FAMILIES.values()
        for name, method in inspect.getmembers(interface, inspect.isfunction)
        if not name.startswith("_")
    }
    assert set(methods) == {
        "init_state",
        "decode_step",
        "request_start",
        "request_end",
        "group_trace_finished",
        "group_vote",
        "denoise_start",
        "unmask_step",
        "route_drafts",
    }
    for name, doc in [(f.__name__, inspect.getdoc(f)) for f in hooks] + [
        (n, inspect.getdoc(m)) for n, m in methods.items()
    ]:
        assert "Called" in (doc or "") or "called" in (doc or ""), name
        assert "Return" in (doc or ""), name


def test_each_policy_is_called_on_its_own_object():
    registry = installed_policies()
    for name, family_method in (("deepconf", "decode_step"), ("eager", "decode_step"), ("ccd", "unmask_step")):
        assert callable(getattr(registry.policy(name), family_method))
    assert registry.policy("deepconf") is not registry.policy("echo")


def test_a_policy_object_without_its_familys_method_is_refused():
    hookimpl = pluggy.HookimplMarker("sglang_entropy")

    class Plugin:
        @hookimpl
        def register_policies(self, register):
            register(PolicySpec(name="routeless", params=PolicyParams, family="speculative"), object())

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(Plugin())
    with pytest.raises(ValueError, match="needs a route_drafts"):
        PolicyRegistry(manager)


def test_group_and_branching_policies_declare_what_the_adapter_reads():
    hookimpl = pluggy.HookimplMarker("sglang_entropy")

    class Plugin:
        @hookimpl
        def register_policies(self, register):
            register(PolicySpec(name="grouping", params=PolicyParams, groups=True), SimpleNamespace(decode_step=print))

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(Plugin())
    with pytest.raises(ValueError, match="GroupParams"):
        PolicyRegistry(manager)


def test_an_implementation_of_a_hook_the_contract_lacks_is_an_error():
    hookimpl = pluggy.HookimplMarker("sglang_entropy")

    class Stale:
        @hookimpl
        def decode_step(self, policy, step):  # the old by-name dispatch
            return None

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(Stale())
    with pytest.raises(pluggy.PluginValidationError):
        manager.check_pending()


def test_installed_policy_is_discovered_through_its_entry_point():
    policy = installed_policies().get("deepconf")
    assert policy.distribution == "sglang-entropy-prune"
    assert policy.version


def test_plugins_command_lists_policies_with_schema():
    out = subprocess.run(
        [sys.executable, "-m", "sglang_entropy.tools.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
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
            deepconf = installed_policies().get("deepconf")
            register(PolicySpec(name=self.name, params=deepconf.spec.params), deepconf.policy)

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


def test_the_readmes_plugin_example_registers_and_decides():
    import re
    import types
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    guide = readme[readme.index("### Writing a policy plugin") :]
    source = re.search(r"```python\n(.*?)```", guide, re.S).group(1)
    module = types.ModuleType("readme_plugin")
    exec(compile(source, "README.md", "exec"), module.__dict__)
    manager = make_plugin_manager(load_entry_points=False)
    manager.register(module)
    manager.check_pending()
    registry = PolicyRegistry(manager)
    step = DecodeStep(
        mask=torch.tensor([True, True]),
        slots=torch.tensor([1, 2]),
        token_index=torch.tensor([0, 0]),
        window_full=torch.tensor([False, False]),
        signals={"entropy": torch.tensor([7.0, 1.0])},
        params={"max_entropy": torch.tensor([6.0, 6.0])},
        state={},
        logits=torch.zeros(2, 8),
    )
    assert registry.policy("entropy-cap").decode_step(step).stop.tolist() == [True, False]
