"""SGLang's MHA KV pool without its Triton KV copy.

With speculative decoding SGLang builds every KV pool with ``enable_kv_cache_copy=True``, which
warms up a tiled Triton copy kernel at construction (no CPU driver: "0 active drivers").
``move_kv_cache`` has a torch-native path; this pool always takes it.
"""

from __future__ import annotations

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool


class PortableMHATokenToKVPool(MHATokenToKVPool):
    def __init__(self, *args, enable_kv_cache_copy: bool = False, **kwargs):
        super().__init__(*args, enable_kv_cache_copy=False, **kwargs)
        self.use_native_move_kv_cache = True
