"""sglang-entropy-specroute: TAPS speculative-draft routing and its domain-specialised drafter models."""
