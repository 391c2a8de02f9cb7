"""Torch-native attention for the speculative forward modes SGLang's torch_native backend lacks.

SGLang 0.5.23's ``TorchNativeAttnBackend`` has an extend path (causal over each request's
extend rows) and a decode path (one query reading ``[0, seq_lens)``). Speculative decoding
(spec v2) needs two more:

* TARGET_VERIFY: ``W`` verify tokens per request at positions ``L .. L+W-1`` (``seq_lens`` is
  the committed length ``L``, without them). Each row reads the prefix ``[0, L)`` and the tree
  nodes its row of ``spec_info.custom_mask`` (FULL_MASK layout) allows; for a chain that is
  the causal triangle.
* multi-step draft decode: draft step ``i`` writes position ``L+i`` and must read
  ``[0, L+i+1)``, while ``seq_lens`` stays ``L`` for every step.

Every query row runs the same single-query SDPA as a plain decode step over exactly the keys
it may see, in the same order, so verify and draft rows compute what step-by-step decoding
computes (the float32 end-to-end test compares greedy outputs token for token).
"""

from __future__ import annotations

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention


class PortableSpecAttnBackend(TorchNativeAttnBackend):
    """``torch_native`` plus TARGET_VERIFY and, with ``kv_len_offset > 0``, the decode of a
    draft step (``kv_len = seq_lens + kv_len_offset``). Other modes are the parent's."""

    def __init__(self, model_runner, kv_len_offset: int = 0):
        super().__init__(model_runner)
        self.kv_len_offset = kv_len_offset

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not forward_batch.forward_mode.is_target_verify():
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        self._check_self_attention(layer, "target verify")
        self._save_kv(layer, forward_batch, k, v, save_kv_cache)
        spec_info = forward_batch.spec_info
        num_draft = spec_info.draft_token_num
        mask = spec_info.custom_mask
        if mask is None:
            raise ValueError("target verify on the portable CPU platform needs spec_info.custom_mask (FULL_MASK)")
        seq_lens = forward_batch.seq_lens.tolist()
        expected = sum(seq_lens) * num_draft + num_draft * num_draft * len(seq_lens)
        if mask.numel() < expected:  # SGLang may over-allocate a FULL_MASK, never under-allocate it
            raise ValueError(
                f"target verify: custom_mask has {mask.numel()} cells, a FULL_MASK for seq_lens {seq_lens} "
                f"and {num_draft} draft tokens needs {expected}; only the FULL_MASK layout is supported"
            )
        req_pool_indices = forward_batch.req_pool_indices.tolist()
        q_, o, o_ = self._query_and_output(q, layer)
        k_cache, v_cache = self._kv_buffers(layer)
        queries = q_.movedim(0, 1)  # [heads, tokens, dim], as the parent lays queries out
        mask_offset = 0
        for b, (length, pool_index) in enumerate(zip(seq_lens, req_pool_indices, strict=True)):
            width = length + num_draft
            slots = self.req_to_token_pool.req_to_token[pool_index, :width]
            rows = mask[mask_offset : mask_offset + num_draft * width].view(num_draft, width)
            mask_offset += num_draft * width
            for j in range(num_draft):
                token = b * num_draft + j
                seen = slots[rows[j]] if not rows[j].all() else slots
                o_[token : token + 1] = self._attend_one(queries, token, k_cache[seen], v_cache[seen], layer)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if self.kv_len_offset == 0:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        self._check_self_attention(layer, "draft decode")
        self._save_kv(layer, forward_batch, k, v, save_kv_cache)
        q_, o, o_ = self._query_and_output(q, layer)
        k_cache, v_cache = self._kv_buffers(layer)
        queries = q_.movedim(0, 1)
        # topk=1 chains: one query per request (trees would need per-branch slot layouts).
        if q_.shape[0] != forward_batch.batch_size:
            raise NotImplementedError(
                "multi-step draft decode on the portable CPU platform supports --speculative-eagle-topk 1 only"
            )
        kv_lens = (forward_batch.seq_lens + self.kv_len_offset).tolist()
        for b, (kv_len, pool_index) in enumerate(zip(kv_lens, forward_batch.req_pool_indices.tolist(), strict=True)):
            slots = self.req_to_token_pool.req_to_token[pool_index, :kv_len]
            o_[b : b + 1] = self._attend_one(queries, b, k_cache[slots], v_cache[slots], layer)
        return o

    @staticmethod
    def _check_self_attention(layer, what: str) -> None:
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError(
                f"{what} on the portable CPU platform supports full causal self-attention only "
                f"(layer {layer.layer_id} is cross-attention or sliding-window)"
            )

    def _save_kv(self, layer, forward_batch, k, v, save_kv_cache: bool) -> None:
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )

    def _kv_buffers(self, layer):
        return (
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
        )

    @staticmethod
    def _query_and_output(q, layer):
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        return (
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
            o,
            o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
        )

    @staticmethod
    def _attend_one(queries, row, keys, values, layer):
        """Query row ``row`` of ``queries`` [heads, tokens, dim] over keys/values [n, kv_heads, dim],
        laid out, cast and passed to SDPA exactly as the parent's decode path does it."""
        query = queries[:, row : row + 1, :]
        keys, values = keys.movedim(0, 1), values.movedim(0, 1)
        if not (query.dtype == keys.dtype == values.dtype):
            keys, values = keys.to(query.dtype), values.to(query.dtype)
        out = scaled_dot_product_attention(
            query.unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
            scale=layer.scaling,
            is_causal=False,
        )
        return out.squeeze(0).movedim(1, 0)  # [1, heads, dim]


class PortableMultiStepDraftBackend:
    """The per-step container EagleDraftWorker.draft_forward expects: ``attn_backends[i]`` runs
    draft step ``i`` (steps ``0 .. num_steps-2`` run a forward; the last only samples)."""

    def __init__(self, model_runner, num_steps: int):
        self.attn_backends = [PortableSpecAttnBackend(model_runner, kv_len_offset=i + 1) for i in range(num_steps - 1)]

    def init_forward_metadata(self, forward_batch) -> None:
        for backend in self.attn_backends:
            backend.init_forward_metadata(forward_batch)
