"""The taps routing policy (plugins/sglang-entropy-specroute) against plain-Python confidences."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sglang_entropy_specroute import policy as taps

from sglang_entropy.types import DraftProposals, RouteDecision


def encode(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Per-row parameters as the adapter passes them (Literal -> index, None -> -1)."""
    models = [taps.TapsParams.model_validate(r) for r in rows]
    return {
        "granularity": torch.tensor([taps.GRANULARITIES.index(m.granularity) for m in models]),
        "confidence": torch.tensor([taps.CONFIDENCES.index(m.confidence) for m in models]),
        "drafter": torch.tensor([-1 if m.drafter is None else m.drafter for m in models]),
    }


def python_confidence(logprobs: list[float], form: str) -> float:
    if form == "token":
        return sum(math.exp(lp) for lp in logprobs) / len(logprobs)
    return sum(math.exp(sum(logprobs[: i + 1])) for i in range(len(logprobs))) / len(logprobs)


shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4))  # D, B, N


@settings(max_examples=60, deadline=None)
@given(
    shapes.flatmap(
        lambda s: st.tuples(
            st.just(s),
            st.lists(st.floats(-8, 0), min_size=s[0] * s[1] * s[2], max_size=s[0] * s[1] * s[2]),
            st.lists(st.sampled_from(["token", "path"]), min_size=s[1], max_size=s[1]),
        )
    )
)
def test_the_chosen_drafter_has_the_highest_confidence(case):
    (num_drafters, batch, steps), values, forms = case
    logprobs = torch.tensor(values, dtype=torch.float32).reshape(num_drafters, batch, steps)
    proposals = DraftProposals(
        tokens=torch.zeros(num_drafters, batch, steps, dtype=torch.int64),
        logprobs=logprobs,
        params=encode([{"confidence": f} for f in forms]),
    )
    decision = taps.Taps().route_drafts(proposals)
    assert isinstance(decision, RouteDecision) and decision.drafter.dtype == torch.int64
    for b in range(batch):
        expected = [python_confidence(logprobs[d, b].tolist(), forms[b]) for d in range(num_drafters)]
        assert decision.confidence[:, b].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
        best = max(expected)
        # Ties within float rounding may go either way; otherwise it is the argmax.
        assert expected[int(decision.drafter[b])] >= best - 1e-6 * max(best, 1e-30)


def proposals_with(logprobs, rows, previous=None):
    logprobs = torch.tensor(logprobs, dtype=torch.float32)
    return DraftProposals(
        tokens=torch.zeros(logprobs.shape, dtype=torch.int64),
        logprobs=logprobs,
        params=encode(rows),
        previous=None if previous is None else torch.tensor(previous),
    )


# Two drafters, two rows, one token: drafter 1 is confident on row 0, drafter 0 on row 1.
LOGPROBS = [[[-3.0], [-0.1]], [[-0.1], [-3.0]]]


def test_granularity_request_keeps_the_first_choice():
    rows = [{"granularity": "request"}, {"granularity": "step"}]
    first = taps.route(proposals_with(LOGPROBS, rows, previous=[-1, -1])).drafter
    assert first.tolist() == [1, 0]
    # Next step the confidences swap: the per-request row keeps drafter 1, the per-step row follows.
    swapped = [[[-0.1], [-3.0]], [[-3.0], [-0.1]]]
    later = taps.route(proposals_with(swapped, rows, previous=first.tolist())).drafter
    assert later.tolist() == [1, 1]


def test_a_forced_drafter_wins_over_confidence():
    rows = [{"drafter": 0}, {"drafter": 1, "granularity": "request"}]
    assert taps.route(proposals_with(LOGPROBS, rows, previous=[1, 0])).drafter.tolist() == [0, 1]


def test_path_confidence_penalises_a_long_unlikely_chain():
    # Drafter 0: one sure token then unsure ones; drafter 1: uniformly fairly sure.
    logprobs = [[[0.0, -2.0, -2.0]], [[-0.4, -0.4, -0.4]]]
    token = taps.route(proposals_with(logprobs, [{"confidence": "token"}])).confidence[:, 0].tolist()
    path = taps.route(proposals_with(logprobs, [{"confidence": "path"}])).confidence[:, 0].tolist()
    assert token == pytest.approx([(1 + 2 * math.exp(-2)) / 3, math.exp(-0.4)])
    assert path == pytest.approx(
        [(1 + math.exp(-2) + math.exp(-4)) / 3, sum(math.exp(-0.4 * k) for k in (1, 2, 3)) / 3]
    )


def test_tree_path_confidence_sums_ancestors():
    # One drafter, one row, nodes 0 (root), 1 (child of 0), 2 (child of 1), 3 (child of 0).
    logprobs = torch.tensor([[[-0.5, -1.0, -0.25, -2.0]]])
    proposals = DraftProposals(
        tokens=torch.zeros(1, 1, 4, dtype=torch.int64),
        logprobs=logprobs,
        parents=torch.tensor([[[-1, 0, 1, 0]]]),
        params={"confidence": torch.tensor([taps.CONFIDENCES.index("path")])},
    )
    expected = sum(math.exp(v) for v in (-0.5, -1.5, -1.75, -2.5)) / 4
    assert taps.route(proposals).confidence[0, 0].item() == pytest.approx(expected)


def test_params_are_validated():
    with pytest.raises(ValueError):
        taps.TapsParams.model_validate({"granularity": "token"})
    with pytest.raises(ValueError):
        taps.TapsParams.model_validate({"drafter": -1})
    with pytest.raises(ValueError):
        taps.TapsParams.model_validate({"unknown": 1})


def test_a_drafter_index_is_checked_against_the_server():
    with pytest.raises(ValueError, match="drafter 2 does not exist: the server has 2 drafters"):
        taps.TapsParams.model_validate({"drafter": 2}, context={"num_drafters": 2})
    assert taps.TapsParams.model_validate({"drafter": 1}, context={"num_drafters": 2}).drafter == 1


def resolve_on_server(raw, drafters=""):
    from sglang_entropy.registry import installed_policies
    from sglang_entropy.settings import ServerSettings

    env = {"SGLANG_ENTROPY_ENABLE": "1", "SGLANG_ENTROPY_DRAFTERS": drafters}
    return ServerSettings.from_env(env).resolve({"entropy": raw}, installed_policies())


def test_requests_for_taps_are_validated_against_the_server():
    from sglang_entropy.settings import EntropyRequestError

    with pytest.raises(EntropyRequestError, match="--entropy-drafters"):
        resolve_on_server({"policy": "taps"})
    with pytest.raises(EntropyRequestError, match=r"params.*drafter 2 does not exist"):
        resolve_on_server({"policy": "taps", "params": {"drafter": 2}}, drafters="a,b")
    resolved = resolve_on_server({"policy": "taps", "params": {"granularity": "request"}}, drafters="a,b")
    assert resolved.policy == "taps" and resolved.params.granularity == "request"


def fake_req(custom=None, output_len=3):
    import uuid
    from types import SimpleNamespace

    return SimpleNamespace(
        rid=uuid.uuid4().hex,
        sampling_params=SimpleNamespace(custom_params=custom),
        customized_info=None,
        output_ids=[0] * output_len,
    )


def test_the_router_routes_each_request_by_its_parameters_and_records_events(monkeypatch):
    from sglang_entropy.adapter.protocol import EVENTS_KEY
    from sglang_entropy.adapter.scheduler.speculative import Router

    monkeypatch.setenv("SGLANG_ENTROPY_DRAFTERS", "a,b")
    router = Router(("a", "b"))
    reqs = [
        fake_req(),  # no policy: taps' defaults
        fake_req({"entropy": {"policy": "taps", "params": {"granularity": "request"}}}, output_len=5),
        fake_req({"entropy": {"policy": "taps", "params": {"drafter": 0}}}),
    ]
    # Row 0 and 1: drafter 1 is surer; row 2 is forced to drafter 0.
    logprobs = torch.tensor([[[-2.0, -2.0]] * 3, [[-0.1, -0.2]] * 3])
    decision = router.route(reqs, torch.zeros(2, 3, 2, dtype=torch.int64), logprobs)
    assert decision.drafter.tolist() == [1, 1, 0]
    router.record(reqs, decision, torch.tensor([2, 1, 3]))
    event = reqs[1].customized_info[EVENTS_KEY][5][0]
    assert reqs[1].customized_info[EVENTS_KEY][:5] == [None] * 5  # on the step's first new token
    assert event["kind"] == "route" and event["drafter"] == 1 and event["drafter_name"] == "b"
    assert event["accepted"] == 1 and event["confidences"] == pytest.approx(
        [math.exp(-2), (math.exp(-0.1) + math.exp(-0.2)) / 2]
    )
    assert reqs[0].customized_info[EVENTS_KEY][3][0]["policy"] == "taps"
    # Next step drafter 0 is surer everywhere: the per-request row keeps drafter 1.
    swapped = logprobs.flip(0)
    assert router.route(reqs, torch.zeros(2, 3, 2, dtype=torch.int64), swapped).drafter.tolist() == [0, 1, 0]
