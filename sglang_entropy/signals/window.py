"""DeepConf group confidence: the mean token confidence over a sliding window, per request.

Each request slot owns one row of a ring buffer on the device. The value of output token ``i``
goes to column ``i % window``, so writing the same token twice (a re-run step) is harmless and
no per-request counter has to be kept in step with the scheduler. ``first_index`` is the first
output token written in this slot: a request that SGLang retracted and re-admitted in another
slot counts its window again from there, never reading another request's values.
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
        first_index: torch.Tensor | None = None,  # [B] int64, first token index written in this slot
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the new tokens; return the window means [B] and whether each window is full [B]."""
        position = token_index % window
        self.values[slots, position] = confidence
        seen = token_index + 1 if first_index is None else (token_index - first_index + 1).clamp(min=1)
        filled = torch.minimum(seen, window)  # tokens in the current window
        rows = self.values[slots]  # [B, W]
        # the filled columns are the `filled` ones ending at `position`, wrapping around
        age = (position[:, None] - self._columns[None, :]) % window[:, None]  # [B, W], 0 = newest
        in_window = (age < filled[:, None]) & (self._columns[None, :] < window[:, None])
        total = torch.where(in_window, rows, torch.zeros_like(rows)).sum(dim=-1)
        return total / filled.to(total.dtype), seen >= window
