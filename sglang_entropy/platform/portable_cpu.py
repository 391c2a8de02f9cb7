"""The platform class: CPU device operations with torch-native kernels.

SGLang's in-tree CPU path needs a from-source ``sgl_kernel`` build. This platform instead runs
every fused op through its torch-native forward (dispatch key ``native``), uses the
torch-native attention backend and keeps Triton off, so the stock wheels serve a model on CPU.
"""

from __future__ import annotations

from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform


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
