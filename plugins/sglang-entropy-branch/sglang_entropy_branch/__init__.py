"""Branch-on-entropy policies for sglang-entropy."""
