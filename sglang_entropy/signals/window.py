"""DeepConf group confidence: the mean token confidence over a sliding window, per request.

Each request slot owns one row of a ring buffer on the device. The value of output token ``i``
goes to column ``i % window``, so writing the same token twice (a re-run step) is harmless and
no per-request counter has to be kept in step with the scheduler.
"""

from __future__ import annotations

import torch


class GroupConfidenceWindows:
    def __init__(self, num_slots: int, max_window: int, device: torch.device | str):
        self.max_window = max_window
        self.values = torch.zeros(num_slots, max_window, dtype=torch.float32, device=device)  # [S, W]
        self._columns = torch.arange(max_window, device=device)  # [W]

    def update(
        self,
        slots: torch.Tensor,  # [B] int64; rows that must not write point at a scratch slot
        token_index: torch.Tensor,  # [B] int64 >= 0, output index of the new token
        confidence: torch.Tensor,  # [B] float32
        window: torch.Tensor,  # [B] int64 in [1, max_window]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the new tokens; return the window means [B] and whether each window is full [B]."""
        self.values[slots, token_index % window] = confidence
        filled = torch.minimum(token_index + 1, window)  # tokens in the current window
        rows = self.values[slots]  # [B, W]
        in_window = self._columns[None, :] < filled[:, None]
        total = torch.where(in_window, rows, torch.zeros_like(rows)).sum(dim=-1)
        return total / filled.to(total.dtype), token_index + 1 >= window
