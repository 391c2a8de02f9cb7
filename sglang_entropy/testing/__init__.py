"""What tests of sglang-entropy and of its plugins share, public so that each plugin's tests run
from its own folder: a pytest plugin (entry point ``pytest11``, ``sglang_entropy.testing.plugin``)
with the launched-server fixtures ``model_path``, ``entropy_server``, ``plain_server`` and
``tokenizer``; ``generate``, one request client; readers of a server's state and metrics; and
float64 NumPy references of the signals (``reference``). Needs the ``test`` extra."""

from sglang_entropy.testing.server import (
    abort_once_branched,
    delta,
    entropy_state,
    generate,
    scrape,
    used_tokens,
)

__all__ = ["abort_once_branched", "delta", "entropy_state", "generate", "scrape", "used_tokens"]
