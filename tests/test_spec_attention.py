"""The portable CPU platform's speculative attention (target verify, multi-step draft decode)
against SGLang's own torch_native decode run token by token, in float32, on a real KV pool."""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_entropy.platform import spec_kernels
from sglang_entropy.platform.spec_attention import PortableMultiStepDraftBackend, PortableSpecAttnBackend
from tests.fresh_interpreter import assert_prints_ok

HEADS, KV_HEADS, DIM, POOL = 4, 2, 8, 128
FULL_MASK = 0


def make_layer():
    return SimpleNamespace(
        layer_id=0,
        tp_q_head_num=HEADS,
        tp_k_head_num=KV_HEADS,
        qk_head_dim=DIM,
        v_head_dim=DIM,
        scaling=DIM**-0.5,
        is_cross_attention=False,
        sliding_window_size=None,
        attn_type=AttentionType.DECODER,
        k_scale=None,
        v_scale=None,
    )


class Setup:
    """A batch with committed prefixes of ``seq_lens`` tokens in a shared pool, slots shuffled,
    and ``width`` new tokens per request (q/k/v) to decode, verify or draft."""

    def __init__(self, seq_lens, width, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.seq_lens, self.width, self.bs = seq_lens, width, len(seq_lens)
        self.prefix_k = torch.zeros(POOL + 1, KV_HEADS, DIM)
        self.prefix_v = torch.zeros(POOL + 1, KV_HEADS, DIM)
        self.rows = torch.tensor([2, 0, 3, 1][: self.bs])
        self.req_to_token = torch.zeros((4, 32), dtype=torch.int32)
        slots = torch.randperm(POOL - 1, generator=g) + 1  # slot 0 is the padding sink
        used = 0
        for b, length in enumerate(seq_lens):
            n = length + width
            self.req_to_token[self.rows[b], :n] = slots[used : used + n].to(torch.int32)
            used += n
            prefix = self.req_to_token[self.rows[b], :length].long()
            self.prefix_k[prefix] = torch.randn(length, KV_HEADS, DIM, generator=g)
            self.prefix_v[prefix] = torch.randn(length, KV_HEADS, DIM, generator=g)
        tokens = self.bs * width  # request-major: token b * width + j is at position seq_lens[b] + j
        self.q = torch.randn(tokens, HEADS * DIM, generator=g)
        self.k = torch.randn(tokens, KV_HEADS, DIM, generator=g)
        self.v = torch.randn(tokens, KV_HEADS, DIM, generator=g)

    def runner(self):
        """A model runner with its own KV pool holding the prefixes, so each backend starts from
        the same state."""
        pool = MHATokenToKVPool(
            size=POOL,
            page_size=1,
            dtype=torch.float32,
            head_num=KV_HEADS,
            head_dim=DIM,
            layer_num=1,
            device="cpu",
            enable_memory_saver=False,
        )
        pool.get_key_buffer(0).copy_(self.prefix_k)
        pool.get_value_buffer(0).copy_(self.prefix_v)
        return SimpleNamespace(
            device="cpu",
            req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token),
            token_to_kv_pool=pool,
        )

    def slot(self, b, position):
        return self.req_to_token[self.rows[b], position].long()

    def batch(self, mode, seq_lens, out_cache_loc, spec_info=None):
        return SimpleNamespace(
            forward_mode=mode,
            seq_lens=torch.tensor(seq_lens),
            req_pool_indices=self.rows,
            out_cache_loc=out_cache_loc,
            encoder_lens=None,
            batch_size=self.bs,
            spec_info=spec_info,
        )

    def decode_token_by_token(self, steps):
        """SGLang's torch_native decode for the first ``steps`` new tokens of every request,
        one step at a time (seq_lens counts the token being decoded)."""
        runner = self.runner()
        backend = TorchNativeAttnBackend(runner)
        out = torch.empty(self.bs, steps, HEADS * DIM)
        for j in range(steps):
            rows = torch.arange(self.bs) * self.width + j
            slots = torch.stack([self.slot(b, self.seq_lens[b] + j) for b in range(self.bs)])
            fb = self.batch(ForwardMode.DECODE, [n + j + 1 for n in self.seq_lens], slots)
            out[:, j] = backend.forward(self.q[rows], self.k[rows], self.v[rows], make_layer(), fb)
        return out, runner.token_to_kv_pool

    def window_slots(self):
        return torch.stack([self.slot(b, self.seq_lens[b] + j) for b in range(self.bs) for j in range(self.width)])


def chain_mask(seq_lens, width):
    """The verify mask SGLang builds for a topk=1 chain (FULL_MASK, prefix filled with True)."""
    bs = len(seq_lens)
    steps = width - 1
    mask = torch.ones(sum(seq_lens) * width + width * width * bs, dtype=torch.bool)
    retrieve = torch.full((3, bs, width), -1, dtype=torch.int64)
    spec_kernels.build_tree_kernel_efficient(
        torch.arange(-1, (steps if steps > 1 else 0) - 1).repeat(bs, 1),
        torch.arange(steps).repeat(bs, 1),
        torch.tensor(seq_lens),
        mask,
        torch.empty(bs * width, dtype=torch.int64),
        *retrieve,
        1,
        steps,
        width,
        FULL_MASK,
    )
    return mask


@pytest.mark.parametrize("seq_lens", [[5], [5, 1, 9], [0, 3]])
@pytest.mark.parametrize("width", [2, 4])
def test_chain_verify_equals_decoding_token_by_token(seq_lens, width):
    setup = Setup(seq_lens, width)
    expected, expected_pool = setup.decode_token_by_token(width)
    runner = setup.runner()
    spec_info = SimpleNamespace(draft_token_num=width, custom_mask=chain_mask(seq_lens, width))
    fb = setup.batch(ForwardMode.TARGET_VERIFY, seq_lens, setup.window_slots(), spec_info)
    out = PortableSpecAttnBackend(runner).forward(setup.q, setup.k, setup.v, make_layer(), fb)
    assert torch.equal(out.view(setup.bs, width, -1), expected)
    assert torch.equal(runner.token_to_kv_pool.get_key_buffer(0), expected_pool.get_key_buffer(0))
    assert torch.equal(runner.token_to_kv_pool.get_value_buffer(0), expected_pool.get_value_buffer(0))


def test_tree_verify_attends_to_prefix_and_ancestors_only():
    """Nodes: 0 root, 1 and 2 children of 0, 3 child of 1. Against float64 masked attention."""
    seq_lens, width = [3, 6], 4
    setup = Setup(seq_lens, width, seed=1)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    mask = torch.cat([torch.cat([torch.ones(width, n, dtype=torch.bool), tree], 1).reshape(-1) for n in seq_lens])
    runner = setup.runner()
    spec_info = SimpleNamespace(draft_token_num=width, custom_mask=mask)
    fb = setup.batch(ForwardMode.TARGET_VERIFY, seq_lens, setup.window_slots(), spec_info)
    out = PortableSpecAttnBackend(runner).forward(setup.q, setup.k, setup.v, make_layer(), fb)

    keys, values = runner.token_to_kv_pool.get_key_buffer(0), runner.token_to_kv_pool.get_value_buffer(0)
    for b, length in enumerate(seq_lens):
        slots = setup.req_to_token[setup.rows[b], : length + width].long()
        for j in range(width):
            seen = slots[torch.cat([torch.ones(length, dtype=torch.bool), tree[j]])]
            k = keys[seen].double().repeat_interleave(HEADS // KV_HEADS, dim=1)  # [n, heads, dim]
            v = values[seen].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
            q = setup.q[b * width + j].double().view(HEADS, DIM)
            weights = torch.softmax(torch.einsum("hd,nhd->hn", q, k) * DIM**-0.5, dim=-1)
            reference = torch.einsum("hn,nhd->hd", weights, v).reshape(-1)
            torch.testing.assert_close(out[b * width + j].double(), reference, rtol=1e-5, atol=1e-6)


def test_multi_step_draft_decode_equals_decoding_token_by_token():
    """Draft step i keeps seq_lens at the committed length and decodes position seq_len + i."""
    seq_lens, steps = [4, 0, 7], 4
    setup = Setup(seq_lens, steps + 1, seed=2)
    expected, _ = setup.decode_token_by_token(steps - 1)
    runner = setup.runner()
    container = PortableMultiStepDraftBackend(runner, steps)
    assert [b.kv_len_offset for b in container.attn_backends] == [1, 2, 3]
    fb = setup.batch(ForwardMode.DECODE, seq_lens, None)
    container.init_forward_metadata(fb)
    for i, backend in enumerate(container.attn_backends):
        rows = torch.arange(setup.bs) * setup.width + i
        fb.out_cache_loc = torch.stack([setup.slot(b, seq_lens[b] + i) for b in range(setup.bs)])
        out = backend.forward(setup.q[rows], setup.k[rows], setup.v[rows], make_layer(), fb)
        assert torch.equal(out, expected[:, i])


def test_other_modes_are_torch_natives():
    """Offset 0 decode and plain extend go to the parent unchanged."""
    setup = Setup([3, 5], 1, seed=3)
    expected, _ = setup.decode_token_by_token(1)
    fb = setup.batch(ForwardMode.DECODE, [4, 6], setup.window_slots())
    out = PortableSpecAttnBackend(setup.runner()).forward(setup.q, setup.k, setup.v, make_layer(), fb)
    assert torch.equal(out, expected[:, 0])


def test_verify_refuses_a_mask_that_is_not_full_mask():
    setup = Setup([5, 2], 3)
    qlen_only = torch.ones(3 * 3 * 2, dtype=torch.bool)
    spec_info = SimpleNamespace(draft_token_num=3, custom_mask=qlen_only)
    fb = setup.batch(ForwardMode.TARGET_VERIFY, [5, 2], setup.window_slots(), spec_info)
    with pytest.raises(ValueError, match="FULL_MASK"):
        PortableSpecAttnBackend(setup.runner()).forward(setup.q, setup.k, setup.v, make_layer(), fb)


def test_draft_decode_refuses_tree_drafts():
    setup = Setup([5, 2], 2)
    fb = setup.batch(ForwardMode.DECODE, [5, 2], setup.window_slots())  # two rows per request: topk=2
    with pytest.raises(NotImplementedError, match="topk 1"):
        PortableSpecAttnBackend(setup.runner(), kv_len_offset=1).forward(setup.q, setup.k, setup.v, make_layer(), fb)


def test_sliding_window_layers_are_refused():
    setup = Setup([5], 2)
    spec_info = SimpleNamespace(draft_token_num=2, custom_mask=chain_mask([5], 2))
    fb = setup.batch(ForwardMode.TARGET_VERIFY, [5], setup.window_slots(), spec_info)
    layer = make_layer()
    layer.sliding_window_size = 4
    with pytest.raises(NotImplementedError, match="sliding-window"):
        PortableSpecAttnBackend(setup.runner()).forward(setup.q, setup.k, setup.v, layer, fb)


def test_platform_opts_into_standalone_only():
    from sglang_entropy.platform.portable_cpu import PortableCpuPlatform
    from sglang_entropy.platform.spec_worker import PortableStandaloneWorker

    platform = PortableCpuPlatform()
    assert platform.supports_speculative_algorithm("STANDALONE")
    assert not platform.supports_speculative_algorithm("EAGLE")
    assert platform.get_speculative_worker_cls("STANDALONE") is PortableStandaloneWorker
    assert platform.get_speculative_worker_cls("EAGLE3") is None
    assert platform.get_speculative_cache_locs_fn() is spec_kernels.assign_extend_cache_locs


def test_standalone_worker_refuses_trees_before_loading_a_model(monkeypatch):
    from sglang_entropy.platform import spec_worker

    monkeypatch.setattr(spec_worker, "get_spec", lambda: SimpleNamespace(speculative_eagle_topk=2))
    monkeypatch.setattr(spec_worker, "get_schedule", lambda: SimpleNamespace(page_size=1))
    with pytest.raises(ValueError, match="--speculative-eagle-topk 1"):
        spec_worker.PortableStandaloneWorker(server_args=None, gpu_id=0, nccl_port=0, target_worker=None)


def test_init_backend_installs_the_attention_backend_and_the_kernel_ports():
    """In a fresh interpreter, as SGLang's model runner import does in each worker process."""
    code = """
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.kernels.ops.speculative import spec_tree
from sglang_entropy.platform.portable_cpu import PortableCpuPlatform
from sglang_entropy.platform.spec_attention import PortableSpecAttnBackend
from sglang_entropy.platform import spec_kernels

PortableCpuPlatform().init_backend()
assert ATTENTION_BACKENDS["torch_native"] is PortableSpecAttnBackend
assert spec_tree.verify_tree_greedy_func.__wrapped__ is not None  # a HookRegistry wrapper
assert spec_kernels._installed
print("ok")
"""
    assert_prints_ok(code)


def test_kv_pool_builds_and_moves_without_triton():
    """SGLang builds speculative KV pools with enable_kv_cache_copy=True, which warms up a
    Triton copy kernel; the platform's pool moves KV with torch instead."""
    from sglang_entropy.platform.kv_pool import PortableMHATokenToKVPool
    from sglang_entropy.platform.portable_cpu import PortableCpuPlatform

    assert PortableCpuPlatform().get_kv_pool_cls(kind="mha") is PortableMHATokenToKVPool
    assert PortableCpuPlatform().get_kv_pool_cls(kind="mla") is None
    pool = PortableMHATokenToKVPool(
        size=16,
        page_size=1,
        dtype=torch.float32,
        head_num=KV_HEADS,
        head_dim=DIM,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
        enable_kv_cache_copy=True,
    )
    for layer in range(2):
        pool.get_key_buffer(layer).copy_(torch.randn(17, KV_HEADS, DIM))
        pool.get_value_buffer(layer).copy_(torch.randn(17, KV_HEADS, DIM))
    before = [pool.get_key_buffer(layer).clone() for layer in range(2)]
    pool.move_kv_cache(torch.tensor([1, 2]), torch.tensor([5, 9]))
    for layer in range(2):
        assert torch.equal(pool.get_key_buffer(layer)[[1, 2]], before[layer][[5, 9]])
