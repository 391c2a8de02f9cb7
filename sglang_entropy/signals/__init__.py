"""Uncertainty signals of next-token distributions, for a whole batch, on the logits' device.

Every function takes device tensors and returns device tensors; nothing here reads a value
back to the host, so the decode step never waits on the device.
"""

from sglang_entropy.signals.token import FULL_VOCAB_SIGNALS, MAX_TOP_K, TOKEN_SIGNALS, Workspace, token_signals
from sglang_entropy.signals.window import GroupConfidenceWindows

SIGNAL_NAMES = (*TOKEN_SIGNALS, "group_confidence")

__all__ = [
    "FULL_VOCAB_SIGNALS",
    "MAX_TOP_K",
    "SIGNAL_NAMES",
    "TOKEN_SIGNALS",
    "GroupConfidenceWindows",
    "Workspace",
    "token_signals",
]
