"""sglang-entropy-specroute: route speculative drafts by draft confidence (TAPS)."""
