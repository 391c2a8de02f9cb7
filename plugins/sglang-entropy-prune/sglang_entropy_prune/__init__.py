"""Confidence pruning policies for sglang-entropy."""
