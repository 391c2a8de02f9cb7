"""SGLang's STANDALONE speculative worker, with the draft attention set up for the portable CPU.

``EagleDraftWorker.init_attention_backend`` asks ``DraftBackendFactory`` for a multi-step
draft-decode backend and a draft-extend backend; the factory has no ``torch_native`` entry and
raises. On this platform the drafter builds the torch-native multi-step backend itself and
lets draft extend run on the draft runner's own backend (the portable CPU platform makes that
a ``PortableSpecAttnBackend``). Everything else is SGLang's ``StandaloneWorkerV2``.
"""

from __future__ import annotations

import logging

from sglang.srt.runtime_context import get_schedule, get_spec
from sglang.srt.speculative.eagle_utils import default_tree_mask_mode
from sglang.srt.speculative.standalone_worker_v2 import StandaloneWorkerV2

from sglang_entropy.platform.spec_attention import PortableMultiStepDraftBackend

logger = logging.getLogger(__name__)


def portable_draft_attention(drafter):
    """REPLACE ``StandaloneDraftWorker.init_attention_backend`` on this platform (every drafter
    SGLang or the adapter builds): SGLang's asks ``DraftBackendFactory``, which has no
    ``torch_native`` entry. Draft step i decodes position seq_len + i, reading
    [0, seq_len + i + 1); a one-step draft only samples from the draft-extend logits and needs
    no decode backend."""
    drafter.draft_attn_backend = (
        PortableMultiStepDraftBackend(drafter.draft_runner, drafter.speculative_num_steps)
        if drafter.speculative_num_steps > 1
        else None
    )
    drafter.draft_extend_attn_backend = None  # draft extend uses draft_runner.attn_backend
    drafter.draft_runner.draft_attn_backend = drafter.draft_attn_backend
    drafter.tree_mask_mode = default_tree_mask_mode()


class PortableStandaloneWorker(StandaloneWorkerV2):
    def __init__(self, server_args, gpu_id, nccl_port, target_worker):
        # Checked before the draft model loads: the torch-native draft decode and the kernel
        # ports cover chains over single-token pages only.
        topk, page_size = get_spec().speculative_eagle_topk, get_schedule().page_size
        if topk != 1 or page_size != 1:
            raise ValueError(
                "STANDALONE speculative decoding on the portable CPU platform supports chain drafts "
                f"only: --speculative-eagle-topk 1 and --page-size 1 (got topk={topk}, page_size={page_size})"
            )
        super().__init__(server_args=server_args, gpu_id=gpu_id, nccl_port=nccl_port, target_worker=target_worker)


DRAFTER_HOOK = (
    "sglang.srt.speculative.standalone_worker_v2.StandaloneDraftWorker.init_attention_backend",
    portable_draft_attention,
)
