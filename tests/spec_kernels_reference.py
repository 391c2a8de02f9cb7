"""Scalar references for the speculative kernels: line-by-line transcriptions of SGLang 0.5.23's
Triton kernels (one loop iteration per Triton program, flat buffers as the kernels address them).

Sources: ``sglang/srt/mem_cache/allocation.py`` (assign_req_to_token_pool),
``sglang/kernels/ops/speculative/cache_locs.py`` (assign_draft_cache_locs_contiguous,
assign_extend_cache_locs), ``.../speculative/eagle.py`` (fill_bonus_tokens) and
``.../speculative/spec_tree.py`` (sgl_build_tree_kernel_efficient_triton,
verify_tree_greedy_kernel_triton).
"""


def assign_req_to_token_pool(req_pool_indices, req_to_token, start, end, out_cache_loc, batch_size):
    """Lists in, the new req_to_token (list of lists) out."""
    table = [list(row) for row in req_to_token]
    for pid in range(batch_size):
        out_offset = sum(end[j] - start[j] for j in range(pid))
        row = table[req_pool_indices[pid]]
        for k, col in enumerate(range(start[pid], end[pid])):
            row[col] = out_cache_loc[out_offset + k]
    return table


def assign_extend_cache_locs(req_pool_indices, req_to_token, start, end, batch_size):
    """The packed gather; only the first sum(end - start) entries are defined."""
    out = []
    for pid in range(batch_size):
        out += [req_to_token[req_pool_indices[pid]][col] for col in range(start[pid], end[pid])]
    return out


def assign_draft_cache_locs_contiguous(req_pool_indices, req_to_token, seq_lens, topk, num_cols):
    """(out_cache_loc, positions, mrope) as flat lists."""
    copy_len = topk * num_cols
    bs = len(seq_lens)
    out, positions, mrope = [0] * (bs * copy_len), [0] * (bs * topk), [0] * (3 * bs * topk)
    for pid in range(bs):
        kv_start = seq_lens[pid]
        row = req_to_token[req_pool_indices[pid]]
        for k in range(copy_len):
            out[pid * copy_len + k] = row[kv_start + k]
        for t in range(topk):
            positions[pid * topk + t] = kv_start
            for axis in range(3):
                mrope[axis * bs * topk + pid * topk + t] = kv_start
    return out, positions, mrope


def fill_bonus_tokens(accept_tokens_flat, accept_lens, accept_stride):
    return [accept_tokens_flat[accept_stride * pid + accept_lens[pid] - 1] for pid in range(len(accept_lens))]


def build_tree(parent_list, selected_index, seq_lens, topk, depth, draft_token_num, full_mask):
    """(tree_mask, positions, retrieve_index, retrieve_next_token, retrieve_next_sibling) as flat
    lists. Mask cells the kernel does not write (the FULL_MASK prefix) are None."""
    bs, n = len(seq_lens), draft_token_num
    if full_mask:
        mask_len = sum(seq_lens) * n + n * n * bs
    else:
        mask_len = n * n * bs
    tree_mask = [None] * mask_len
    positions = [None] * (bs * n)
    retrieve_index = [-1] * (bs * n)
    next_token = [-1] * (bs * n)
    next_sibling = [-1] * (bs * n)
    prefix_sum = [sum(seq_lens[:b]) for b in range(bs)]
    for b in range(bs):
        seq_len = seq_lens[b]
        sel, parents = selected_index[b], parent_list[b]
        seq_tree_idx = n * n * b + prefix_sum[b] * n
        positions[b * n] = seq_len
        for i in range(n - 1, 0, -1):
            retrieve_index[b * n + i] = b * n + i
            parent_tb_idx = sel[i - 1] // topk
            parent_position, found = 0, False
            if parent_tb_idx == 0:
                found = True
            else:
                parent_token_idx = parents[parent_tb_idx]
                for pp in range(n - 1):
                    if not found and sel[pp] == parent_token_idx:
                        parent_position, found = pp + 1, True
            if found:
                addr = b * n + parent_position
                if next_token[addr] == -1:
                    next_token[addr] = i
                else:
                    previous = next_token[addr]
                    next_token[addr] = i
                    next_sibling[b * n + i] = previous
        retrieve_index[b * n] = b * n
        for x in range(n):
            if full_mask:
                token_tree_idx = seq_tree_idx + (seq_len + n) * x + seq_len + 1
            else:
                token_tree_idx = n * n * b + n * x + 1
            tree_mask[token_tree_idx - 1] = True
            for i in range(n - 1):
                tree_mask[token_tree_idx + i] = False
            if x > 0:
                cur, position, go = x - 1, 0, True
                for _ in range(depth):
                    if go:
                        position += 1
                        tree_mask[token_tree_idx + cur] = True
                        parent_tb_idx = sel[cur] // topk
                        if parent_tb_idx == 0:
                            go = False
                        else:
                            parent_token_idx = parents[parent_tb_idx]
                            found = False
                            for cp in range(n - 1):
                                if not found and sel[cp] == parent_token_idx:
                                    cur, found = cp, True
                            if not found:
                                go = False
                positions[b * n + x] = position + seq_len
    return tree_mask, positions, retrieve_index, next_token, next_sibling


def verify_tree_greedy(predicts, accept_index, candidates, retrieve_index, next_token, next_sibling, target_predict):
    """Inputs as nested lists ([bs][n] for the per-node ones, flat ``predicts``, ``accept_index``
    [bs][num_spec]); returns (predicts, accept_index, accept_token_num)."""
    predicts = list(predicts)
    accept_index = [list(row) for row in accept_index]
    bs, n = len(candidates), len(candidates[0])
    num_spec = len(accept_index[0])
    flat_target = [t for row in target_predict for t in row]
    accept_num = []
    for bx in range(bs):
        last = retrieve_index[bx][0]
        accept_index[bx][0] = last
        num, cur = 0, 0
        for _ in range(1, num_spec):
            cur = next_token[bx][cur]
            target = flat_target[last]
            found = 0
            for _ in range(n):
                if found == 0:
                    if cur == -1:
                        found = -1
                        break
                    if candidates[bx][cur] == target:
                        predicts[last] = target
                        num += 1
                        accept_index[bx][num] = retrieve_index[bx][cur]
                        last = retrieve_index[bx][cur]
                        found = 1
                    else:
                        cur = next_sibling[bx][cur]
            if found != 1:
                break
        accept_num.append(num)
        predicts[last] = flat_target[last]
    return predicts, accept_index, accept_num
