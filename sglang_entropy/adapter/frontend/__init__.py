"""The adapter in SGLang's HTTP server process (the tokenizer manager): validates requests,
runs groups of traces and branching requests, shapes ``meta_info["entropy"]``."""
