"""Turning the adapter on: the launch check and the runtime hooks, registered once per process
when ``--enable-entropy`` is parsed or ``SGLANG_ENTROPY_ENABLE=1`` is set."""

from __future__ import annotations

import os

from sglang.srt.plugins.hook_registry import HookType

from sglang_entropy.settings import ENV_DLLM, ENV_ENABLE, ServerSettings

_activated = False
HTTP_APP_ENV = "SGLANG_HTTP_SERVER_APP_PATH"  # the app SGLang's uvicorn tokenizer workers import
HTTP_APP = "sglang_entropy.adapter.frontend.app:app"


def checked_settings() -> ServerSettings:
    """The server's settings, checked as far as a launch can check them. An invalid
    configuration ends the process with the reason as the last line of its output, whichever
    way the adapter was enabled: SGLang logs and skips a plugin that raises an ordinary
    exception, which would leave the server running without the adapter."""
    from sglang_entropy.registry import installed_policies

    try:
        settings = ServerSettings.from_env()
        if settings.enabled:
            settings.check(installed_policies())
    except ValueError as e:
        raise SystemExit(f"sglang-entropy: {e}") from None
    return settings


def check_launch(result, server_args, *args, **kwargs):
    """After SGLang resolved its arguments in the launcher (before any model loads): the flags
    have set the environment, so the whole configuration is checked here once more, with
    SGLang's own. (``ServerArgs`` is a msgspec Struct, which binds ``__post_init__`` when the
    class is made: ``resolve_once`` is the first method of it a hook can wrap.)"""
    from sglang_entropy.registry import installed_policies

    if server_args.dllm_algorithm:  # SGLang's processes (spawned after this) resolve requests with it
        os.environ[ENV_DLLM] = server_args.dllm_algorithm
    settings = checked_settings()
    try:
        settings.check_decoding(installed_policies(), server_args.speculative_algorithm, server_args.dllm_algorithm)
    except ValueError as e:
        raise SystemExit(f"sglang-entropy: {e}") from None
    if settings.drafters and server_args.speculative_algorithm != "STANDALONE":
        raise SystemExit(
            "sglang-entropy: --entropy-drafters routes STANDALONE speculative decoding; launch with "
            f"--speculative-algorithm STANDALONE (got {server_args.speculative_algorithm})"
        )


LAUNCH_HOOK = ("sglang.srt.server_args.ServerArgs.resolve_once", check_launch, HookType.AFTER)


def activate() -> None:
    """Register the runtime hooks (idempotent). Called at plugin load when the environment
    enables the adapter, or when ``--enable-entropy`` is parsed in the launcher; the flag also
    sets the environment so SGLang's subprocesses activate at their own plugin load."""
    global _activated
    os.environ[ENV_ENABLE] = "1"
    os.environ.setdefault(HTTP_APP_ENV, HTTP_APP)  # tokenizer workers load the plugins too
    if _activated:
        return
    _activated = True
    # Resolving our targets imports model_runner (via sglang.srt.dllm.algorithm), and importing
    # it runs the platform's init_backend(), which on portable_cpu applies the registered hooks
    # while ModelRunner is still undefined. Import it before registering hooks on ModelRunner.
    import sglang.srt.model_executor.model_runner  # noqa: F401
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_entropy.adapter.frontend import serving
    from sglang_entropy.adapter.scheduler import dllm, drafters, hooks, speculative

    for target, hook, hook_type in (
        LAUNCH_HOOK,
        drafters.HOOK,
        *hooks.HOOKS,
        *serving.HOOKS,
        *dllm.HOOKS,
        *speculative.HOOKS,
        dllm.ALGORITHM_HOOK,
    ):
        HookRegistry.register(target, hook, hook_type)
    HookRegistry.apply_hooks()
