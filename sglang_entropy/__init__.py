"""sglang-entropy: uncertainty-aware decoding policies for SGLang, shipped as plugins."""

from sglang_entropy.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
