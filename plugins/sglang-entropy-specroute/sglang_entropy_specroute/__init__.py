"""sglang-entropy-specroute: route speculative drafts by draft confidence (TAPS), and build domain drafters for it."""
