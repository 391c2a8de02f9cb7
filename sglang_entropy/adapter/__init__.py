"""The SGLang runtime adapter: an SGLang general plugin (entry-point group ``sglang.srt.plugins``).

SGLang runs ``load()`` in every process before it parses the server arguments. It always adds
the launch flags; everything else is registered only when the adapter is enabled, by
``--enable-entropy`` or ``SGLANG_ENTROPY_ENABLE=1`` (``activation``), so an installed but
disabled adapter leaves SGLang exactly as it was.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_entropy.adapter.activation import activate, checked_settings
from sglang_entropy.adapter.flags import add_flags


def load() -> None:
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", add_flags, HookType.AFTER)
    if checked_settings().enabled:
        activate()
