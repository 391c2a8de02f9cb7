"""On-demand benchmarks (``pytest -m slow``): they start two servers and take minutes."""

import json
from argparse import Namespace

import pytest

from sglang_entropy.tools.bench import run_overhead
from sglang_entropy.tools.server import has_gpu


@pytest.mark.slow
def test_adapter_overhead_at_batch_32_is_within_target(model_path, tmp_path):
    out = tmp_path / "overhead"
    args = Namespace(
        model_path=str(model_path),
        batch_sizes="32",
        new_tokens=64,
        rounds=5,
        out=str(out),
        policy="deepconf",
        policy_params='{"threshold": 0.0}',  # confidence is never below 0: the step runs, nothing stops
    )
    assert run_overhead(args) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    ratios = {r["arm"]: r["ratio_to_disabled"] for r in results}
    allowed_loss = 0.02 if has_gpu() else 0.05
    assert ratios["signals + deepconf"] >= 1 - allowed_loss, ratios
    assert ratios["signals on"] >= 1 - allowed_loss, ratios
