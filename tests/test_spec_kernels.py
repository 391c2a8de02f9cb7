"""The torch ports of SGLang's speculative kernels against scalar transcriptions of the Triton
kernels (tests/spec_kernels_reference.py), plus hand-worked chains."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_entropy.platform import spec_kernels as sk
from tests import spec_kernels_reference as ref
from tests.fresh_interpreter import assert_prints_ok

FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2


@st.composite
def req_ranges(draw):
    """A req_to_token table, the rows of a batch, and a [start, end) range in each row."""
    pool_len = draw(st.integers(4, 24))
    num_rows = draw(st.integers(1, 6))
    bs = draw(st.integers(1, num_rows))
    rows = draw(st.permutations(range(num_rows)))[:bs]
    starts, ends = [], []
    for _ in range(bs):
        start = draw(st.integers(0, pool_len))
        starts.append(start)
        ends.append(draw(st.integers(start, pool_len)))
    table = [[draw(st.integers(0, 999)) for _ in range(pool_len)] for _ in range(num_rows)]
    return table, rows, starts, ends


@settings(max_examples=60, deadline=None)
@given(case=req_ranges(), seed=st.integers(0, 2**16))
def test_assign_req_to_token_pool_writes_each_range_from_the_packed_locations(case, seed):
    table, rows, starts, ends = case
    total = sum(e - s for s, e in zip(starts, ends, strict=True))
    out_cache_loc = torch.randint(0, 10_000, (total + 3,), generator=torch.Generator().manual_seed(seed))
    req_to_token = torch.tensor(table, dtype=torch.int32)
    sk.assign_req_to_token_pool(
        torch.tensor(rows),
        req_to_token,
        torch.tensor(starts),
        torch.tensor(ends),
        out_cache_loc,
        len(rows),
    )
    expected = ref.assign_req_to_token_pool(rows, table, starts, ends, out_cache_loc.tolist(), len(rows))
    assert req_to_token.tolist() == expected


@settings(max_examples=60, deadline=None)
@given(case=req_ranges())
def test_assign_extend_cache_locs_gathers_each_range_packed(case):
    table, rows, starts, ends = case
    width = max([e - s for s, e in zip(starts, ends, strict=True)] + [1])
    out = sk.assign_extend_cache_locs(
        req_pool_indices=torch.tensor(rows, dtype=torch.int64),
        req_to_token=torch.tensor(table, dtype=torch.int32),
        start_offset=torch.tensor(starts),
        end_offset=torch.tensor(ends),
        batch_size=len(rows),
        draft_token_num=width,
        device="cpu",
    )
    expected = ref.assign_extend_cache_locs(rows, table, starts, ends, len(rows))
    assert out.dtype == torch.int64 and out.shape == (len(rows) * width,)
    assert out[: len(expected)].tolist() == expected


@settings(max_examples=60, deadline=None)
@given(
    bs=st.integers(1, 5),
    topk=st.integers(1, 3),
    num_cols=st.integers(1, 5),
    with_positions=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_assign_draft_cache_locs_contiguous_copies_the_window_and_positions(bs, topk, num_cols, with_positions, seed):
    g = torch.Generator().manual_seed(seed)
    pool_len = 40
    req_to_token = torch.randint(0, 5000, (bs + 2, pool_len), dtype=torch.int32, generator=g)
    rows = torch.randperm(bs + 2, generator=g)[:bs]
    seq_lens = torch.randint(0, pool_len - topk * num_cols + 1, (bs,), generator=g)
    out = torch.full((bs * topk * num_cols,), -7, dtype=torch.int64)
    positions = torch.full((bs * topk,), -7, dtype=torch.int64) if with_positions else None
    mrope = torch.full((3, bs * topk), -7, dtype=torch.int64) if with_positions else None
    sk.assign_draft_cache_locs_contiguous(rows, req_to_token, seq_lens, out, topk, num_cols, positions, mrope)
    exp_out, exp_positions, exp_mrope = ref.assign_draft_cache_locs_contiguous(
        rows.tolist(), req_to_token.tolist(), seq_lens.tolist(), topk, num_cols
    )
    assert out.tolist() == exp_out
    if with_positions:
        assert positions.tolist() == exp_positions
        assert mrope.reshape(-1).tolist() == exp_mrope


@settings(max_examples=60, deadline=None)
@given(bs=st.integers(1, 6), stride=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_fill_bonus_tokens_takes_each_requests_last_accepted_token(bs, stride, seed):
    g = torch.Generator().manual_seed(seed)
    accept_tokens = torch.randint(0, 50_000, (bs, stride), generator=g)
    accept_lens = torch.randint(1, stride + 1, (bs,), dtype=torch.int32, generator=g)
    bonus = torch.empty(bs, dtype=torch.int32)
    sk.fill_bonus_tokens(accept_tokens, accept_lens, bonus, stride, bs)
    assert bonus.tolist() == ref.fill_bonus_tokens(accept_tokens.reshape(-1).tolist(), accept_lens.tolist(), stride)


@st.composite
def draft_trees(draw):
    """EAGLE draft-tree inputs laid out as organize_draft_results produces them: step 0 adds
    topk candidates (children of the root), step i >= 1 adds topk^2 candidates, children of the
    topk nodes chosen at step i - 1 (parents_list[i]). The verify set is any sorted subset, so a
    selected node's parent may be missing, a case the kernel handles."""
    topk = draw(st.integers(1, 3))
    steps = draw(st.integers(1, 4))
    bs = draw(st.integers(1, 3))
    num_candidates = topk + (steps - 1) * topk * topk
    num_verify = draw(st.integers(2, min(num_candidates + 1, 8)))
    parent_rows, selected_rows = [], []
    for _ in range(bs):
        parents = [-1, *range(topk)]
        for i in range(1, steps - 1):  # parents_list[:-1] for i >= 1
            first = topk + (i - 1) * topk * topk
            parents += sorted(draw(st.permutations(range(first, first + topk * topk)))[:topk])
        parent_rows.append(parents if steps > 1 else [])
        selected_rows.append(sorted(draw(st.permutations(range(num_candidates)))[: num_verify - 1]))
    seq_lens = [draw(st.integers(0, 6)) for _ in range(bs)]
    return topk, steps, num_verify, parent_rows, selected_rows, seq_lens


def run_build_tree(topk, steps, num_verify, parent_rows, selected_rows, seq_lens, mode, mask_init=None):
    bs = len(seq_lens)
    width = len(parent_rows[0])
    parent_list = torch.tensor(parent_rows, dtype=torch.int64).reshape(bs, width)
    if mode == FULL_MASK:
        mask_len = sum(seq_lens) * num_verify + num_verify * num_verify * bs
    else:
        mask_len = num_verify * num_verify * bs
    tree_mask = mask_init.clone() if mask_init is not None else torch.ones(mask_len, dtype=torch.bool)
    positions = torch.empty(bs * num_verify, dtype=torch.int64)
    retrieve = torch.full((3, bs, num_verify), -1, dtype=torch.int64)
    sk.build_tree_kernel_efficient(
        parent_list,
        torch.tensor(selected_rows, dtype=torch.int64),
        torch.tensor(seq_lens, dtype=torch.int64),
        tree_mask,
        positions,
        retrieve[0],
        retrieve[1],
        retrieve[2],
        topk,
        steps,
        num_verify,
        mode,
    )
    return tree_mask, positions, retrieve


@settings(max_examples=150, deadline=None)
@given(tree=draft_trees(), full_mask=st.booleans(), seed=st.integers(0, 2**16))
def test_build_tree_matches_the_triton_kernel(tree, full_mask, seed):
    topk, steps, num_verify, parent_rows, selected_rows, seq_lens = tree
    mode = FULL_MASK if full_mask else QLEN_ONLY
    exp_mask, exp_positions, exp_index, exp_next, exp_sibling = ref.build_tree(
        parent_rows, selected_rows, seq_lens, topk, steps, num_verify, full_mask
    )
    # Random initial mask: the cells the kernel does not write (FULL_MASK prefix) must keep it.
    init = torch.rand(len(exp_mask), generator=torch.Generator().manual_seed(seed)) < 0.5
    tree_mask, positions, retrieve = run_build_tree(*tree, mode, mask_init=init)
    expected_mask = [init[i].item() if cell is None else cell for i, cell in enumerate(exp_mask)]
    assert tree_mask.tolist() == expected_mask
    assert positions.tolist() == exp_positions
    assert retrieve[0].reshape(-1).tolist() == exp_index
    assert retrieve[1].reshape(-1).tolist() == exp_next
    assert retrieve[2].reshape(-1).tolist() == exp_sibling


@pytest.mark.parametrize("steps", [1, 3])
def test_build_tree_for_a_topk1_chain(steps):
    """The inputs EagleDraftWorker passes for topk=1 (its prealloc parent/score buffers)."""
    seq_lens = [5, 2]
    width = steps + 1
    parents = torch.arange(-1, (steps if steps > 1 else 0) - 1).repeat(2, 1)
    tree = (1, steps, width, parents.tolist(), torch.arange(steps).repeat(2, 1).tolist(), seq_lens)
    tree_mask, positions, retrieve = run_build_tree(*tree, FULL_MASK)
    assert positions.tolist() == [5 + i for i in range(width)] + [2 + i for i in range(width)]
    assert retrieve[0].tolist() == [list(range(width)), list(range(width, 2 * width))]
    assert retrieve[1].tolist() == [list(range(1, width)) + [-1]] * 2
    assert retrieve[2].tolist() == [[-1] * width] * 2
    # FULL_MASK: per request, `width` rows of (seq_len + width) columns; the prefix is all True
    # (the caller's fill) and the tree part is causal.
    offset = 0
    for seq_len in seq_lens:
        rows = tree_mask[offset : offset + width * (seq_len + width)].view(width, seq_len + width)
        assert rows[:, :seq_len].all()
        assert torch.equal(rows[:, seq_len:], torch.ones(width, width, dtype=torch.bool).tril())
        offset += width * (seq_len + width)
    assert offset == tree_mask.numel()


def test_build_tree_rejects_the_bitpacked_mask():
    with pytest.raises(NotImplementedError, match="QLEN_ONLY_BITPACKING|mode 2"):
        sk.build_tree_kernel_efficient(
            torch.empty(1, 0, dtype=torch.int64),
            torch.zeros(1, 1, dtype=torch.int64),
            torch.tensor([3]),
            torch.zeros(2, dtype=torch.uint8),
            torch.empty(2, dtype=torch.int64),
            *torch.full((3, 1, 2), -1, dtype=torch.int64),
            1,
            1,
            2,
            QLEN_ONLY_BITPACKING,
        )


def run_verify(candidates, retrieve, target_predict, num_spec):
    bs, n = candidates.shape
    predicts = torch.zeros(bs * n, dtype=torch.int32)
    accept_index = torch.full((bs, num_spec), -1, dtype=torch.int32)
    accept_num = torch.empty(bs, dtype=torch.int32)
    out = sk.verify_tree_greedy(
        predicts=predicts,
        accept_index=accept_index,
        accept_token_num=accept_num,
        candidates=candidates,
        retrieve_index=retrieve[0],
        retrieve_next_token=retrieve[1],
        retrieve_next_sibling=retrieve[2],
        target_predict=target_predict,
        topk=1,
    )
    assert out[0] is predicts and out[1] is accept_index and out[2] is accept_num
    return predicts, accept_index, accept_num


@settings(max_examples=150, deadline=None)
@given(tree=draft_trees(), vocab=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_verify_tree_greedy_matches_the_triton_kernel(tree, vocab, seed):
    topk, steps, num_verify, parent_rows, selected_rows, seq_lens = tree
    _, _, retrieve = run_build_tree(*tree, QLEN_ONLY)
    g = torch.Generator().manual_seed(seed)
    bs = len(seq_lens)
    # A small vocabulary so that drafts often match the target and whole paths get accepted.
    candidates = torch.randint(0, vocab, (bs, num_verify), generator=g)
    target_predict = torch.randint(0, vocab, (bs, num_verify), generator=g)
    num_spec = steps + 1
    predicts, accept_index, accept_num = run_verify(candidates, retrieve, target_predict, num_spec)
    exp_predicts, exp_accept_index, exp_num = ref.verify_tree_greedy(
        [0] * (bs * num_verify),
        [[-1] * num_spec for _ in range(bs)],
        candidates.tolist(),
        retrieve[0].tolist(),
        retrieve[1].tolist(),
        retrieve[2].tolist(),
        target_predict.tolist(),
    )
    assert accept_num.tolist() == exp_num
    assert accept_index.tolist() == exp_accept_index
    assert predicts.tolist() == exp_predicts


def test_verify_greedy_chain_accepts_the_matching_prefix_and_adds_the_bonus():
    steps, width = 3, 4
    tree = (1, steps, width, torch.arange(-1, steps - 1).repeat(3, 1).tolist(), [[0, 1, 2]] * 3, [4, 4, 4])
    _, _, retrieve = run_build_tree(*tree, FULL_MASK)
    # Column 0 is the bonus token; the target's argmax after column j must equal draft j + 1.
    candidates = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 13], [10, 11, 12, 13]])
    target = torch.tensor(
        [
            [11, 12, 99, 98],  # drafts 11, 12 accepted, 13 rejected: the target's 99 is the bonus
            [11, 12, 13, 14],  # all three accepted, then 14
            [77, 12, 13, 14],  # the first draft rejected: only the target's 77
        ]
    )
    predicts, accept_index, accept_num = run_verify(candidates, retrieve, target, steps + 1)
    assert accept_num.tolist() == [2, 3, 0]
    assert accept_index.tolist() == [[0, 1, 2, -1], [4, 5, 6, 7], [8, -1, -1, -1]]
    committed = [predicts[accept_index[b, : accept_num[b] + 1].long()].tolist() for b in range(3)]
    assert committed == [[11, 12, 99], [11, 12, 13, 14], [77]]


def test_install_replaces_the_sglang_kernels_and_their_imported_copies():
    """In a fresh interpreter: after install(), SGLang's functions and the `from X import Y`
    copies in the speculative modules call the ports."""
    code = """
import torch
import sglang.srt.speculative.eagle_worker_common as common
import sglang.srt.speculative.eagle_utils as utils
import sglang.srt.mem_cache.allocation as allocation
from sglang.kernels.ops.speculative import cache_locs, eagle, spec_tree
from sglang_entropy.platform import spec_kernels as sk

sk.install()
sk.install()  # idempotent
# Each copy is the same REPLACE wrapper around SGLang's original.
assert common.assign_draft_cache_locs_contiguous_func is cache_locs.assign_draft_cache_locs_contiguous_func
assert common.fill_bonus_tokens_func is eagle.fill_bonus_tokens_func
assert utils.build_tree_kernel_efficient_func is spec_tree.build_tree_kernel_efficient_func
assert utils.verify_tree_greedy_func is spec_tree.verify_tree_greedy_func
assert spec_tree.verify_tree_greedy_func.__wrapped__.__module__ == spec_tree.__name__
# SGLang's originals launch Triton (no CPU driver) or reject an out-of-tree platform; the
# wrappers must run the ports instead.
table = torch.zeros(2, 6, dtype=torch.int32)
allocation.assign_req_to_token_pool_func(
    torch.tensor([1]), table, torch.tensor([2]), torch.tensor([4]), torch.tensor([7, 8]), 1
)
assert table[1].tolist() == [0, 0, 7, 8, 0, 0], table
out = torch.empty(2, dtype=torch.int64)
common.assign_draft_cache_locs_contiguous_func(torch.tensor([1]), table, torch.tensor([2]), out, 1, 2)
assert out.tolist() == [7, 8], out
bonus = torch.empty(1, dtype=torch.int32)
common.fill_bonus_tokens_func(torch.tensor([[5, 6, 7]]), torch.tensor([2]), bonus, 3, 1)
assert bonus.tolist() == [6], bonus
mask, positions = torch.ones(2 * 2 + 4, dtype=torch.bool), torch.empty(2, dtype=torch.int64)
retrieve = torch.full((3, 1, 2), -1, dtype=torch.int64)
utils.build_tree_kernel_efficient_func(
    torch.empty(1, 0, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64), torch.tensor([2]),
    mask, positions, *retrieve, 1, 1, 2, spec_tree.TreeMaskMode.FULL_MASK,
)
assert retrieve[1].tolist() == [[1, -1]] and positions.tolist() == [2, 3], (retrieve, positions)
predicts, accept_index, num = torch.zeros(2, dtype=torch.int32), torch.full((1, 2), -1), torch.empty(1)
utils.verify_tree_greedy_func(
    predicts, accept_index, num, torch.tensor([[3, 4]]), *retrieve, torch.tensor([[4, 9]]), topk=1
)
assert num.tolist() == [1] and predicts.tolist() == [4, 9], (num, predicts)
print("ok")
"""
    assert_prints_ok(code)
