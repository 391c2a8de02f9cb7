"""Every SGLang target the adapter and the portable CPU platform hook or override still exists
in the installed SGLang.

``HookRegistry.apply_hooks`` logs and skips a target it cannot resolve, and SGLang never calls
a platform or worker method it no longer has, so after an SGLang upgrade a renamed target would
silently switch a hook off. These checks fail fast instead: no server, no model, a few seconds.
"""

from __future__ import annotations

import inspect
import pkgutil
from collections import defaultdict

import pytest
from sglang.srt.plugins.hook_registry import HookRegistry, HookType


def resolve(target: str):
    """Resolve ``target`` as ``HookRegistry._apply_target`` does (it exposes no resolver of its
    own): split off the last name, ``pkgutil.resolve_name`` the owner (module plus attribute
    chain), ``getattr`` the last name."""
    obj_path, attr_name = target.rsplit(".", 1)  # ValueError without a dot, as in SGLang
    return getattr(pkgutil.resolve_name(obj_path), attr_name)


def unresolved(target: str, hook_type: HookType) -> str | None:
    """Why HookRegistry could not apply a ``hook_type`` hook to ``target`` here, or None."""
    try:
        original = resolve(target)
    except (ImportError, AttributeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    if not callable(original):
        return f"resolves to a non-callable {type(original).__name__}"
    if isinstance(original, type) and hook_type != HookType.REPLACE:
        return f"is a class; HookRegistry allows only REPLACE on a class, not {hook_type}"
    return None


def collected_hooks() -> list[tuple[str, str, object, HookType]]:
    """(where it is registered, target, hook, hook type) of every HookRegistry registration."""
    from sglang_entropy.adapter.activation import LAUNCH_HOOK
    from sglang_entropy.adapter.flags import add_flags
    from sglang_entropy.adapter.frontend import serving
    from sglang_entropy.adapter.scheduler import dllm, drafters, speculative
    from sglang_entropy.adapter.scheduler import hooks as scheduler_hooks
    from sglang_entropy.platform import spec_kernels, spec_requests, spec_worker

    hooks = [
        (f"{module.__name__}.HOOKS", target, hook, hook_type)
        for module in (scheduler_hooks, serving, dllm, speculative)
        for target, hook, hook_type in module.HOOKS
    ]
    hooks.append(("sglang_entropy.adapter.scheduler.dllm.ALGORITHM_HOOK", *dllm.ALGORITHM_HOOK))
    hooks.append(("sglang_entropy.adapter.scheduler.drafters.HOOK", *drafters.HOOK))
    hooks.append(("sglang_entropy.adapter.activation.LAUNCH_HOOK", *LAUNCH_HOOK))
    # Registered inside sglang_entropy.adapter.load(), which has no module-level list of it.
    hooks.append(
        ("sglang_entropy.adapter.load", "sglang.srt.server_args.ServerArgs.add_cli_args", add_flags, HookType.AFTER)
    )
    # PortableCpuPlatform.init_backend registers spec_requests.HOOK (AFTER), spec_worker.DRAFTER_HOOK (REPLACE) ...
    hooks.append(("sglang_entropy.platform.spec_requests.HOOK", *spec_requests.HOOK, HookType.AFTER))
    hooks.append(("sglang_entropy.platform.spec_worker.DRAFTER_HOOK", *spec_worker.DRAFTER_HOOK, HookType.REPLACE))
    # ... and spec_kernels.install() every spec_kernels._TARGETS entry as REPLACE.
    hooks += [
        ("sglang_entropy.platform.spec_kernels._TARGETS", target, getattr(spec_kernels, name), HookType.REPLACE)
        for target, name in spec_kernels._TARGETS.items()
    ]
    return hooks


def test_every_hook_target_resolves_in_the_installed_sglang():
    hooks = collected_hooks()
    assert hooks, "no hook targets collected"
    problems = []
    for where, target, hook, hook_type in hooks:
        if not isinstance(hook_type, HookType):
            problems.append(f"{target} ({where}): hook type {hook_type!r} is not a HookType")
            continue
        if not callable(hook):
            problems.append(f"{target} ({where}): hook {hook!r} is not callable")
        reason = unresolved(target, hook_type)
        if reason:
            problems.append(f"{target} ({where}): {reason}")
    assert not problems, "hook targets missing from the installed SGLang:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "target",
    [
        "sglang.srt.managers.scheduler.Scheduler.no_such_method",  # missing attribute
        "sglang.srt.managers.no_such_module.Scheduler.handle_generate_request",  # missing module
        "sglang.srt.server_args.SGLANG_NO_SUCH_NAME.__post_init__",  # missing attribute mid-chain
        "no_dots_at_all",
    ],
)
def test_a_missing_target_is_reported(target):
    assert unresolved(target, HookType.AROUND) is not None


def test_a_non_callable_or_class_target_is_reported():
    # A module-level constant, and a class hooked with something other than REPLACE.
    assert "non-callable" in unresolved("sglang.srt.plugins.hook_registry.logger", HookType.AROUND)
    assert "class" in unresolved("sglang.srt.managers.scheduler.Scheduler", HookType.AROUND)
    assert unresolved("sglang.srt.managers.scheduler.Scheduler", HookType.REPLACE) is None


def test_the_collected_hooks_are_exactly_the_ones_registered(monkeypatch):
    """Runs the registering code itself (the adapter's load()/activate() with the adapter
    enabled, the platform's init_backend()) against an empty registry with apply_hooks()
    switched off, so a registration added anywhere without being collected above fails here."""
    from sglang.srt.layers.attention import attention_registry

    import sglang_entropy.adapter as adapter
    from sglang_entropy.adapter import activation
    from sglang_entropy.platform import spec_kernels
    from sglang_entropy.platform.portable_cpu import PortableCpuPlatform
    from sglang_entropy.settings import ENV_ENABLE

    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    monkeypatch.setattr(HookRegistry, "apply_hooks", classmethod(lambda cls: None))
    monkeypatch.setattr(activation, "_activated", False)
    monkeypatch.setattr(adapter, "checked_settings", lambda: type("Enabled", (), {"enabled": True})())
    monkeypatch.setenv(ENV_ENABLE, "0")  # activate() sets it; restored afterwards
    monkeypatch.setattr(spec_kernels, "_installed", False)
    monkeypatch.setitem(
        attention_registry.ATTENTION_BACKENDS,
        "torch_native",
        attention_registry.ATTENTION_BACKENDS.get("torch_native"),
    )

    adapter.load()
    PortableCpuPlatform().init_backend()

    registered = {(target, hook, ht) for target, entries in HookRegistry._hooks.items() for ht, hook, _ in entries}
    collected = {(target, hook, ht) for _, target, hook, ht in collected_hooks()}
    assert registered == collected, (
        f"registered but not collected: {sorted(t for t, _, _ in registered - collected)}; "
        f"collected but not registered: {sorted(t for t, _, _ in collected - registered)}"
    )


# Names a platform class defines that are its own helpers, not overrides of an SGLang method.
OWN_HELPERS = {
    "PortableSpecAttnBackend": {"_check_self_attention", "_save_kv", "_kv_buffers", "_query_and_output", "_attend_one"},
    "DrafterGroup": {"_each", "_combine", "_failed"},
}


def overrides():
    """(platform class, the SGLang class whose methods it overrides or stands in for)."""
    from sglang.srt.speculative.standalone_worker_v2 import StandaloneDraftWorker

    from sglang_entropy.adapter.scheduler.drafters import DrafterGroup
    from sglang_entropy.platform.kv_pool import PortableMHATokenToKVPool
    from sglang_entropy.platform.portable_cpu import PortableCpuPlatform
    from sglang_entropy.platform.spec_attention import PortableSpecAttnBackend
    from sglang_entropy.platform.spec_worker import PortableStandaloneWorker

    subclasses = [
        PortableCpuPlatform,
        PortableMHATokenToKVPool,
        PortableSpecAttnBackend,
        PortableStandaloneWorker,
    ]
    pairs = [(cls, cls.__mro__[1:]) for cls in subclasses]
    pairs.append((DrafterGroup, StandaloneDraftWorker.__mro__))  # takes the place of SGLang's drafter
    return pairs


def test_every_platform_override_still_overrides_an_sglang_method():
    problems = []
    for cls, bases in overrides():
        assert any(base.__module__.startswith("sglang.") for base in bases), cls
        helpers = OWN_HELPERS.get(cls.__name__, set())
        for name, value in vars(cls).items():
            if name.startswith("__") or name in helpers:
                continue
            if not (inspect.isfunction(value) or isinstance(value, (property, staticmethod, classmethod))):
                continue
            if not any(name in vars(base) for base in bases):
                problems.append(
                    f"{cls.__module__}.{cls.__qualname__}.{name} overrides nothing in SGLang "
                    f"(or is a helper of its own: add it to OWN_HELPERS)"
                )
    assert not problems, "\n".join(problems)


def test_sglang_attributes_the_platform_replaces_exist():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.model_runner import ModelRunner

    # init_backend re-registers SGLang's "torch_native" backend name with PortableSpecAttnBackend.
    assert "torch_native" in ATTENTION_BACKENDS
    # spec_worker._LogprobRecorder wraps the draft runner's forward.
    assert callable(ModelRunner.forward)
    # kv_pool passes enable_kv_cache_copy=False and sets use_native_move_kv_cache.
    assert "enable_kv_cache_copy" in inspect.signature(MHATokenToKVPool.__init__).parameters
    assert "self.use_native_move_kv_cache" in inspect.getsource(MHATokenToKVPool)
