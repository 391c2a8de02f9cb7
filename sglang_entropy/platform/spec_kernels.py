"""Torch ports of the speculative-decoding kernels SGLang launches through Triton.

On the portable CPU platform SGLang's ``is_cpu()`` is False (it means the Intel ``sgl_kernel``
engine), so the STANDALONE/EAGLE path either launches Triton (no CPU driver) or calls
``reject_out_of_tree_path``. Each function here takes the same arguments as the SGLang
function it replaces, mutates the same outputs, and is written in plain device-agnostic torch.
``install()`` swaps them in with HookRegistry REPLACE hooks; the platform calls it from
``init_backend()``, so they are active only in processes where ``portable_cpu`` is the platform.
"""

from __future__ import annotations

from typing import Optional

import torch

# SGLang target -> port. HookRegistry's REPLACE also re-points the `from X import Y` copies
# (eagle_utils, eagle_worker_common) already imported when the hooks are applied.
_TARGETS = {
    "sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func": "assign_req_to_token_pool",
    "sglang.kernels.ops.speculative.cache_locs.assign_draft_cache_locs_contiguous_func": (
        "assign_draft_cache_locs_contiguous"
    ),
    "sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func": "fill_bonus_tokens",
    "sglang.kernels.ops.speculative.spec_tree.build_tree_kernel_efficient_func": "build_tree_kernel_efficient",
    "sglang.kernels.ops.speculative.spec_tree.verify_tree_greedy_func": "verify_tree_greedy",
}

# TreeMaskMode values (sglang.kernels.ops.speculative.spec_tree.TreeMaskMode), kept as ints so
# this module imports without SGLang's Triton kernels.
_FULL_MASK, _QLEN_ONLY = 0, 1

_installed = False


def install() -> None:
    """Register the ports as REPLACE hooks and apply them (idempotent)."""
    global _installed
    if _installed:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    module = globals()
    for target, name in _TARGETS.items():
        HookRegistry.register(target, module[name], HookType.REPLACE)
    HookRegistry.apply_hooks()
    _installed = True


def _segments(start: torch.Tensor, end: torch.Tensor, batch_size: int):
    """For per-request ranges [start, end): the request and column of every element, in
    request-major order, as the Triton kernels lay them out in their flat buffers."""
    start = start[:batch_size].to(torch.int64)
    lens = end[:batch_size].to(torch.int64) - start
    request = torch.repeat_interleave(torch.arange(batch_size, device=start.device), lens)
    first = torch.cumsum(lens, 0) - lens  # each request's offset in the flat buffer
    column = start[request] + torch.arange(request.numel(), device=start.device) - first[request]
    return request, column


def assign_req_to_token_pool(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    batch_size: int,
) -> None:
    """``req_to_token[rpi[b], start[b]:end[b]] = out_cache_loc[packed slice of b]``."""
    request, column = _segments(start_offset, end_offset, batch_size)
    rows = req_pool_indices[:batch_size].to(torch.int64)[request]
    req_to_token[rows, column] = out_cache_loc[: column.numel()].to(req_to_token.dtype)


def assign_extend_cache_locs(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    batch_size: int,
    draft_token_num: int,
    device,
) -> torch.Tensor:
    """The inverse gather: the slots ``req_to_token[rpi[b], start[b]:end[b]]``, packed
    request by request into a ``batch_size * draft_token_num`` int64 buffer (the platform's
    ``get_speculative_cache_locs_fn``)."""
    out = torch.empty((batch_size * draft_token_num,), dtype=torch.int64, device=device)
    request, column = _segments(start_offset, end_offset, batch_size)
    rows = req_pool_indices[:batch_size].to(torch.int64)[request]
    out[: column.numel()] = req_to_token[rows, column].to(torch.int64)
    return out


def assign_draft_cache_locs_contiguous(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor,
    topk: int,
    num_cols: int,
    positions: Optional[torch.Tensor] = None,
    mrope: Optional[torch.Tensor] = None,
) -> None:
    """Copy each request's ``topk * num_cols`` slots from ``seq_lens`` on into
    ``out_cache_loc``; write ``seq_lens`` as each of its ``topk`` draft positions (and the
    three M-RoPE axes) when those buffers are given."""
    bs = seq_lens.shape[0]
    width = topk * num_cols
    seq = seq_lens.to(torch.int64)
    columns = seq.unsqueeze(1) + torch.arange(width, device=seq.device)
    rows = req_pool_indices[:bs].to(torch.int64).unsqueeze(1)
    out_cache_loc[: bs * width] = req_to_token[rows, columns].reshape(-1).to(out_cache_loc.dtype)
    per_draft = seq.repeat_interleave(topk)
    if positions is not None:
        positions[: bs * topk] = per_draft.to(positions.dtype)
    if mrope is not None:
        mrope.view(3, -1)[:, : bs * topk] = per_draft.to(mrope.dtype)


def fill_bonus_tokens(
    accept_tokens: torch.Tensor,
    accept_lens: torch.Tensor,
    bonus_tokens: torch.Tensor,
    accept_stride: int,
    batch_size: int,
) -> None:
    """``bonus[b] = accept_tokens[b * stride + accept_lens[b] - 1]``: each request's last
    accepted token (``accept_lens`` counts the bonus)."""
    index = (
        torch.arange(batch_size, device=accept_lens.device) * accept_stride
        + accept_lens[:batch_size].to(torch.int64)
        - 1
    )
    bonus_tokens[:batch_size] = accept_tokens.reshape(-1)[index].to(bonus_tokens.dtype)


def build_tree_kernel_efficient(
    parent_list: torch.Tensor,
    top_scores_index: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    positions: torch.Tensor,
    retrieve_index: torch.Tensor,
    retrieve_next_token: torch.Tensor,
    retrieve_next_sibling: torch.Tensor,
    topk: int,
    spec_steps: int,
    num_verify_tokens: int,
    tree_mask_mode,
) -> None:
    """Port of ``sgl_build_tree_kernel_efficient_triton`` (chains and trees).

    Node 0 of each request is the bonus token; node ``i >= 1`` is the draft token
    ``top_scores_index[b, i - 1]``, whose parent is found through ``parent_list``. Writes the
    retrieve links (first child / next sibling; the caller pre-fills them with -1), each node's
    position (``seq_len`` + depth) and the tree part of the mask (each node attends to itself
    and its ancestors); the prefix columns of a FULL_MASK are the caller's.
    """
    mode = int(tree_mask_mode)
    if mode not in (_FULL_MASK, _QLEN_ONLY):
        raise NotImplementedError(
            f"build_tree_kernel_efficient: tree mask mode {tree_mask_mode!r} is not supported on the "
            "portable CPU platform (FULL_MASK and QLEN_ONLY are)"
        )
    bs, width = seq_lens.shape[0], num_verify_tokens
    device = seq_lens.device
    if bs == 0:
        return
    selected = top_scores_index[:, : width - 1].to(torch.int64)  # node i -> selected[:, i - 1]
    parent_slot = selected // topk
    is_root_child = parent_slot == 0
    if parent_list.dim() != 2:
        raise ValueError(f"build_tree_kernel_efficient: parent_list must be [batch, n], got {tuple(parent_list.shape)}")
    if parent_list.shape[1] > 0:
        parent_token = torch.gather(parent_list.to(torch.int64), 1, parent_slot.clamp(0, parent_list.shape[1] - 1))
    else:  # a one-step draft: every node hangs off the root
        parent_token = torch.full_like(selected, -1)
    match = selected.unsqueeze(1) == parent_token.unsqueeze(2)  # [b, node - 1, candidate parent - 1]
    first_match = match.to(torch.int8).argmax(dim=2)  # argmax returns the first maximum
    # Tree position of each node's parent: 0 = root, -1 = parent not among the selected nodes.
    parent_pos = torch.where(is_root_child, 0, torch.where(match.any(dim=2), first_match + 1, -1))

    rows = torch.arange(bs, device=device)
    retrieve_index.copy_(rows.unsqueeze(1) * width + torch.arange(width, device=device))
    # Children are linked in reverse order so a parent's first child is its smallest node.
    for i in range(width - 1, 0, -1):
        parent = parent_pos[:, i - 1]
        linked = parent >= 0
        slot = parent.clamp(min=0).unsqueeze(1)
        previous = torch.gather(retrieve_next_token, 1, slot).squeeze(1)
        retrieve_next_sibling[:, i] = torch.where(linked & (previous != -1), previous, retrieve_next_sibling[:, i])
        retrieve_next_token.scatter_(1, slot, torch.where(linked, i, previous).unsqueeze(1))

    # Walk at most `spec_steps` ancestors from every node, as the kernel does.
    attends = torch.zeros((bs, width, width), dtype=torch.bool, device=device)
    attends[:, :, 0] = True
    depth = torch.zeros((bs, width), dtype=torch.int64, device=device)
    current = torch.arange(width - 1, device=device).expand(bs, -1)  # node - 1
    active = torch.ones((bs, width - 1), dtype=torch.bool, device=device)
    for _ in range(spec_steps):
        column = torch.nn.functional.one_hot(current.clamp(min=0) + 1, width).to(torch.bool)
        attends[:, 1:] |= column & active.unsqueeze(2)
        depth[:, 1:] += active
        current = torch.gather(parent_pos, 1, current.clamp(min=0)) - 1
        active &= current >= 0
    positions[: bs * width] = (seq_lens.to(torch.int64).unsqueeze(1) + depth).reshape(-1).to(positions.dtype)

    cells = torch.arange(width, device=device)
    if mode == _FULL_MASK:
        seq = seq_lens.to(torch.int64)
        row_len = seq + width
        start = width * width * rows + (torch.cumsum(seq, 0) - seq) * width
        index = (
            start.view(bs, 1, 1)
            + row_len.view(bs, 1, 1) * cells.view(1, width, 1)
            + seq.view(bs, 1, 1)
            + cells.view(1, 1, width)
        )
    else:
        index = width * width * rows.view(bs, 1, 1) + width * cells.view(1, width, 1) + cells.view(1, 1, width)
    tree_mask[index.reshape(-1)] = attends.reshape(-1).to(tree_mask.dtype)


def verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrieve_index: torch.Tensor,
    retrieve_next_token: torch.Tensor,
    retrieve_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
    topk: int = -1,
):
    """Port of ``verify_tree_greedy_kernel_triton``: from the root, repeatedly descend to the
    first child whose draft token equals the target's argmax at the last accepted node.

    ``predicts`` (flat, indexed by global node) gets the target token at every accepted node,
    ``accept_index[b, 0..n]`` the accepted global nodes (root first), ``accept_token_num[b]``
    the number of accepted draft tokens ``n``.
    """
    bs, width = candidates.shape
    depth = accept_index.shape[1]
    if bs == 0:
        return predicts, accept_index, accept_token_num
    device = candidates.device
    rows = torch.arange(bs, device=device)
    targets = target_predict.reshape(-1)
    last = retrieve_index[:, 0].to(torch.int64)
    accept_index[:, 0] = last.to(accept_index.dtype)
    accepted = torch.zeros(bs, dtype=torch.int64, device=device)
    node = torch.zeros(bs, dtype=torch.int64, device=device)
    going = torch.ones(bs, dtype=torch.bool, device=device)
    for j in range(1, depth):
        node = torch.where(going, retrieve_next_token[rows, node.clamp(min=0)].to(torch.int64), node)
        target = targets[last]
        found = torch.zeros(bs, dtype=torch.bool, device=device)
        for _ in range(width):  # the siblings of this level
            valid = going & ~found & (node != -1)
            safe = node.clamp(min=0)
            draft_index = retrieve_index[rows, safe].to(torch.int64)
            hit = valid & (candidates[rows, safe] == target)
            predicts[last] = torch.where(hit, target.to(predicts.dtype), predicts[last])
            accept_index[:, j] = torch.where(hit, draft_index.to(accept_index.dtype), accept_index[:, j])
            accepted += hit
            last = torch.where(hit, draft_index, last)
            found |= hit
            node = torch.where(valid & ~hit, retrieve_next_sibling[rows, safe].to(torch.int64), node)
        going &= found
    accept_token_num[:bs] = accepted.to(accept_token_num.dtype)
    predicts[last] = targets[last].to(predicts.dtype)
    return predicts, accept_index, accept_token_num
