"""Plugin discovery and the registry of installed policies."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pluggy

from sglang_entropy import hookspecs
from sglang_entropy.types import PolicySpec

ENTRY_POINT_GROUP = "sglang_entropy.policies"


@dataclass(frozen=True)
class InstalledPolicy:
    spec: PolicySpec
    distribution: str | None
    version: str | None


class PolicyRegistry:
    def __init__(self, plugin_manager: pluggy.PluginManager):
        self.hook = plugin_manager.hook
        self._policies: dict[str, InstalledPolicy] = {}
        # Call each implementation on its own so every policy is tied to its distribution.
        for impl in plugin_manager.hook.register_policies.get_hookimpls():
            dist = _distribution_of(plugin_manager, impl.plugin)
            impl.function(register=functools.partial(self._add, dist=dist))

    def _add(self, spec: PolicySpec, dist=None) -> None:
        if spec.name in self._policies:
            other = self._policies[spec.name].distribution
            raise ValueError(f"policy {spec.name!r} is registered twice ({other} and {dist and dist.name})")
        self._policies[spec.name] = InstalledPolicy(spec, dist.name if dist else None, dist.version if dist else None)

    def names(self) -> list[str]:
        return sorted(self._policies)

    def get(self, name: str) -> InstalledPolicy:
        return self._policies[name]

    def __contains__(self, name: str) -> bool:
        return name in self._policies

    def __iter__(self):
        return iter(self._policies[name] for name in self.names())


def _distribution_of(plugin_manager, plugin):
    for loaded, dist in plugin_manager.list_plugin_distinfo():
        if loaded is plugin:
            return dist
    return None


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    plugin_manager = pluggy.PluginManager("sglang_entropy")
    plugin_manager.add_hookspecs(hookspecs)
    if load_entry_points:
        plugin_manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return plugin_manager


@functools.cache
def installed_policies() -> PolicyRegistry:
    """The registry of every policy installed in this Python environment."""
    return PolicyRegistry(make_plugin_manager())
