"""Plugin discovery and the registry of installed policies."""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass

import annotated_types
import pluggy

from sglang_entropy import hookspecs
from sglang_entropy.types import BranchParams, GroupParams, PolicyParams, PolicySpec

ENTRY_POINT_GROUP = "sglang_entropy.policies"


@dataclass(frozen=True)
class InstalledPolicy:
    spec: PolicySpec
    policy: object  # the object that decides: the interface of spec.family (hookspecs)
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

    def _add(self, spec: PolicySpec, policy: object, dist=None) -> None:
        check_params_model(spec)
        check_policy_object(spec, policy)
        if spec.name in self._policies:
            other = self._policies[spec.name].distribution
            raise ValueError(f"policy {spec.name!r} is registered twice ({other} and {dist and dist.name})")
        self._policies[spec.name] = InstalledPolicy(
            spec, policy, dist.name if dist else None, dist.version if dist else None
        )

    def names(self) -> list[str]:
        return sorted(self._policies)

    def get(self, name: str) -> InstalledPolicy:
        return self._policies[name]

    def policy(self, name: str):
        """The object that decides for policy ``name``."""
        return self._policies[name].policy

    def __contains__(self, name: str) -> bool:
        return name in self._policies

    def __iter__(self):
        return iter(self._policies[name] for name in self.names())

    def dllm_policies(self) -> dict[str, str]:
        """SGLang dLLM algorithm name -> policy name, for every installed diffusion policy."""
        return {p.spec.dllm_algorithm: p.spec.name for p in self if p.spec.family == "dllm"}


# Bounds that fit the adapter's per-slot device buffers (int64 and float32) with room to compute.
INT_LIMIT = 2**62
FLOAT_LIMIT = 1e30


def check_policy_object(spec: PolicySpec, policy: object) -> None:
    """The policy object has its family's method, and group or branching policies declare the
    parameters the adapter reads for them."""
    where = f"policy {spec.name!r}"
    if spec.family not in hookspecs.FAMILIES:
        raise ValueError(f"{where}: unknown family {spec.family!r}; families: {sorted(hookspecs.FAMILIES)}")
    method = hookspecs.REQUIRED_METHOD[spec.family]
    if not callable(getattr(policy, method, None)):
        raise ValueError(f"{where}: a {spec.family} policy object needs a {method}() method")
    if spec.groups and not issubclass(spec.params, GroupParams):
        raise ValueError(f"{where}: groups=True needs params that extend sglang_entropy.types.GroupParams")
    if spec.branches and not issubclass(spec.params, BranchParams):
        raise ValueError(f"{where}: branches=True needs params that extend sglang_entropy.types.BranchParams")


def check_params_model(spec: PolicySpec) -> None:
    """Refuse a policy whose parameters a request could set to a value the adapter cannot hold:
    the model must extend ``PolicyParams`` (no unknown keys, no NaN or infinity), every int or
    float field needs a lower and an upper bound within INT_LIMIT / FLOAT_LIMIT, every string
    a maximum length, and other types (lists, dicts, nested models) are not parameters."""
    where = f"policy {spec.name!r} ({spec.params.__module__}.{spec.params.__qualname__})"
    if not (isinstance(spec.params, type) and issubclass(spec.params, PolicyParams)):
        raise ValueError(f"{where}: params must extend sglang_entropy.types.PolicyParams")
    config = spec.params.model_config
    if config.get("extra") != "forbid" or config.get("allow_inf_nan", True):
        raise ValueError(f"{where}: params must keep PolicyParams' extra='forbid' and allow_inf_nan=False")
    for name, info in spec.params.model_fields.items():
        problem = _field_problem(_scalar_type(info.annotation), info.metadata)
        if problem:
            raise ValueError(f"{where}: parameter {name!r} {problem}")


def _scalar_type(annotation):
    """The type of a parameter, without ``| None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _field_problem(kind, metadata) -> str | None:
    if kind is bool or typing.get_origin(kind) is typing.Literal:
        return None
    if kind is str:
        if not any(isinstance(m, annotated_types.MaxLen) for m in metadata):
            return "is a string without max_length"
        return None
    if kind not in (int, float):
        return f"has type {kind!r}; parameters are numbers, bools, bounded strings or Literals"
    limit = INT_LIMIT if kind is int else FLOAT_LIMIT
    lower = [
        m.ge if isinstance(m, annotated_types.Ge) else m.gt
        for m in metadata
        if isinstance(m, (annotated_types.Ge, annotated_types.Gt))
    ]
    upper = [
        m.le if isinstance(m, annotated_types.Le) else m.lt
        for m in metadata
        if isinstance(m, (annotated_types.Le, annotated_types.Lt))
    ]
    if not lower or not upper:
        return "needs both a lower and an upper bound (ge/gt and le/lt)"
    if not (-limit <= max(lower) and min(upper) <= limit):
        return f"has bounds beyond +-{limit:g}, which the device buffers cannot hold"
    return None


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
        plugin_manager.check_pending()  # an implementation of a hook the contract does not have
    return plugin_manager


@functools.cache
def installed_policies() -> PolicyRegistry:
    """The registry of every policy installed in this Python environment."""
    return PolicyRegistry(make_plugin_manager())
