"""The eager policy's decisions, without a server."""

import pytest
import torch
from pydantic import ValidationError
from sglang_entropy_branch.policy import EagerParams, eager_branch

from sglang_entropy.types import DecodeStep


def step(topk_entropy, entropy, group_confidence, echo):
    rows = len(topk_entropy)
    return DecodeStep(
        mask=torch.ones(rows, dtype=torch.bool),
        slots=torch.arange(rows),
        token_index=torch.zeros(rows, dtype=torch.long),
        window_full=torch.ones(rows, dtype=torch.bool),
        signals={
            "topk_entropy": torch.tensor(topk_entropy),
            "entropy": torch.tensor(entropy),
            "group_confidence": torch.tensor(group_confidence),
        },
        params={"threshold": torch.full((rows,), 2.4), "echo_width": torch.full((rows,), echo)},
        state={},
        logits=torch.zeros(rows, 8),
    )


def test_eager_forks_one_sequence_above_the_threshold():
    decision = eager_branch(step([2.0, 2.5, 3.0], [3.0, 3.0, 3.0], [1.0, 1.0, 1.0], False))
    assert decision.branch_width.tolist() == [0, 1, 1]


def test_echo_width_grows_with_entropy_and_falls_with_group_confidence():
    # 1 + 2 (H - 1) / 2.5 - (G - 1.2) / 1.2, rounded and clipped to [1, 4]
    decision = eager_branch(step([3.0] * 4, [1.0, 3.5, 6.0, 3.5], [1.2, 1.2, 1.2, 4.8], True))
    assert decision.branch_width.tolist() == [1, 3, 4, 1]


def test_budget_group_needs_a_budget_and_sampling():
    with pytest.raises(ValidationError, match="go together"):
        EagerParams(budget_group="g")
    with pytest.raises(ValidationError, match="temperature > 0"):
        EagerParams.model_validate({}, context={"temperature": 0.0})
