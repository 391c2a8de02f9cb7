"""The platform class: CPU device operations with torch-native kernels.

SGLang's in-tree CPU path needs a from-source ``sgl_kernel`` build. This platform instead runs
every fused op through its torch-native forward (dispatch key ``native``), uses the
torch-native attention backend and keeps Triton off, so the stock wheels serve a model on CPU.

It also serves STANDALONE speculative decoding with chain drafts (``--speculative-eagle-topk 1``):
torch ports of the speculative kernels (``spec_kernels``), a torch-native attention backend with
the target-verify and draft-decode modes (``spec_attention``) and a drafter that uses it
(``spec_worker``).
"""

from __future__ import annotations

from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

SPECULATIVE_ALGORITHM = "STANDALONE"  # draft model + target verify; chains only (see spec_worker)


class PortableCpuPlatform(CpuDeviceMixin, SRTPlatform):
    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    capabilities = PlatformCapabilities()  # no Triton, no graph capture

    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    def get_dispatch_key_name(self) -> str:
        return "native"

    def apply_server_args_defaults(self, server_args) -> None:
        # The only sampling backend without a CUDA kernel, and torch-native attention.
        if server_args.sampling_backend is None:
            server_args.sampling_backend = "pytorch"
        if server_args.attention_backend is None:
            server_args.attention_backend = "torch_native"
        if server_args.device is None:
            server_args.device = "cpu"
        # The scheduler otherwise polls its sockets in a busy loop, taking a whole core from
        # the model's own forward passes (and from any second server on the machine).
        server_args.sleep_on_idle = True

    def init_backend(self) -> None:
        # SGLang calls this in every worker process when it imports the model runner, before
        # any attention backend or speculative worker is built.
        from sglang.srt.layers.attention.attention_registry import register_attention_backend
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from sglang_entropy.platform import spec_kernels, spec_requests, spec_worker
        from sglang_entropy.platform.spec_attention import PortableSpecAttnBackend

        # Same as torch_native in every mode torch_native has, plus the speculative ones.
        register_attention_backend("torch_native")(PortableSpecAttnBackend)
        spec_kernels.install()
        # Sampled requests on a speculative server fail alone instead of crashing the scheduler.
        HookRegistry.register(*spec_requests.HOOK, HookType.AFTER)
        # Every STANDALONE drafter SGLang (or the adapter) builds gets the torch-native draft attention.
        HookRegistry.register(*spec_worker.DRAFTER_HOOK, HookType.REPLACE)
        HookRegistry.apply_hooks()

    def get_kv_pool_cls(self, *, kind):
        if kind != "mha":
            return None
        from sglang_entropy.platform.kv_pool import PortableMHATokenToKVPool

        return PortableMHATokenToKVPool

    def supports_speculative_algorithm(self, algorithm: str) -> bool:
        return algorithm == SPECULATIVE_ALGORITHM

    def get_speculative_worker_cls(self, algorithm: str):
        if algorithm != SPECULATIVE_ALGORITHM:
            return None
        from sglang_entropy.platform.spec_worker import PortableStandaloneWorker

        return PortableStandaloneWorker

    def get_speculative_cache_locs_fn(self):
        from sglang_entropy.platform.spec_kernels import assign_extend_cache_locs

        return assign_extend_cache_locs
