"""sglang-entropy: uncertainty-aware decoding policies for SGLang, shipped as plugins."""

__version__ = "0.1.0"
