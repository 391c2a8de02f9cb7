"""Portable CPU platform for SGLang: the real server on a plain x86-64 or arm64 CPU.

SGLang finds hardware platforms through the entry-point group ``sglang.srt.platforms``. This
one is selected only by ``SGLANG_PLATFORM=portable_cpu``; without that it stays inactive, so it
never takes over a machine with a GPU (SGLang activates every platform whose ``activate()``
returns a class path when no platform is named).
"""

from __future__ import annotations

import os

PLATFORM_NAME = "portable_cpu"


def activate() -> str | None:
    if os.environ.get("SGLANG_PLATFORM") != PLATFORM_NAME:
        return None
    return "sglang_entropy.platform.portable_cpu.PortableCpuPlatform"
