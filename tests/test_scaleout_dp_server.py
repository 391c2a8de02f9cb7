"""End to end: with several data-parallel ranks, a budget group's requests are pinned to one
rank, where its budget is kept (the launcher binds each rank to its own cores)."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_entropy.tools import server as sglang_server
from tests.test_scaleout_server import SMALL_KV, generate

pytestmark = pytest.mark.server


def test_a_budget_group_holds_across_data_parallel_ranks(model_path):
    with sglang_server.launch(
        model_path, extra_args=["--dp-size", "2", "--entropy-policies", "eager", *SMALL_KV]
    ) as server:
        name = uuid.uuid4().hex
        params = {"threshold": 0.0, "max_sequences": 3, "budget_group": name, "budget": 3}
        with ThreadPoolExecutor(2) as pool:
            answers = list(
                pool.map(
                    lambda t: generate(server, {"policy": "eager", "params": params}, text=t, ignore_eos=True).json(),
                    ["What is 3 + 4?", "Name a colour."],
                )
            )
        assert sum(len(a) for a in answers) == 3  # one pool, on the rank the name chose
