"""Several policies in one request: the composition rules of the request, the merge of their
decisions in the runtime, and a forked sequence inheriting its parent's state.

The server tests (``test_composition_server.py``) run the same on the real scheduler."""

import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import Field

from sglang_entropy import hookimpl
from sglang_entropy.adapter import protocol
from sglang_entropy.adapter.scheduler import runtime as rt
from sglang_entropy.adapter.scheduler.branching import BranchBook
from sglang_entropy.registry import PolicyRegistry, make_plugin_manager
from sglang_entropy.settings import EntropyRequestError, ServerSettings
from sglang_entropy.types import (
    BranchParams,
    ConfidenceParams,
    DecodeDecision,
    GroupParams,
    PolicyParams,
    PolicySpec,
    UnmaskDecision,
)
from tests.test_runtime import FakeReq, run_step


class Limit(PolicyParams):
    limit: float = Field(1.0, ge=0, le=100)
    bias: float = Field(0.0, ge=-10, le=10)


class Windowed(ConfidenceParams):
    limit: float = Field(1.0, ge=0, le=100)


class Width(PolicyParams):
    width: int = Field(1, ge=0, le=8)


class Forking(BranchParams, Width):
    pass


class Stopper:
    def decode_step(self, step):
        bias = torch.zeros_like(step.logits)
        bias[:, 3] = step.params["bias"]
        return DecodeDecision(
            stop=step.signals["entropy"] > step.params["limit"],
            event_values={"limit": step.params["limit"]},
            logit_bias=bias,
        )


class Fork:
    def decode_step(self, step):
        return DecodeDecision(branch_width=step.params["width"], event_values={"width": step.params["width"]})


class Counter:
    """Per-slot state: how many steps each request has taken (inherited by forked children)."""

    def init_state(self, num_slots, device):
        return {"steps": torch.zeros(num_slots, dtype=torch.int64, device=device)}

    def request_start(self, request, state):
        state["steps"][request.slot] = 0

    def decode_step(self, step):
        state = step.state["steps"]
        state[step.slots] = torch.where(step.mask, state[step.slots] + 1, state[step.slots])
        return None


class BadReason:
    def decode_step(self, step):
        return DecodeDecision(stop=step.mask, stop_reason=torch.full_like(step.token_index, 3))


class Unmask:
    def unmask_step(self, step):
        return UnmaskDecision(commit=step.masked)


class Plugin:
    @hookimpl
    def register_policies(self, register):
        register(PolicySpec(name="low", params=Limit, stop_reasons=("above",), signals=("entropy",)), Stopper())
        register(PolicySpec(name="high", params=Limit, stop_reasons=("over",), signals=("entropy",)), Stopper())
        register(PolicySpec(name="windowed", params=Windowed, signals=("confidence",)), Stopper())
        register(PolicySpec(name="windowed2", params=Windowed, signals=("confidence",)), Stopper())
        register(PolicySpec(name="fork", params=Forking, signals=(), branches=True), Fork())
        register(PolicySpec(name="fork2", params=Forking, signals=(), branches=True), Fork())
        register(PolicySpec(name="widen", params=Width, signals=()), Fork())  # asks for widths, forks nothing itself

        class Grouped(GroupParams):
            threshold: float = Field(1.0, ge=0, le=10)

        register(PolicySpec(name="grouped", params=Grouped, signals=(), groups=True), Stopper())
        register(PolicySpec(name="grouped2", params=Grouped, signals=(), groups=True), Stopper())
        register(PolicySpec(name="counter", params=PolicyParams, signals=()), Counter())
        register(PolicySpec(name="bad_reason", params=PolicyParams, stop_reasons=("only",), signals=()), BadReason())
        register(PolicySpec(name="unmask", params=PolicyParams, family="dllm", dllm_algorithm="Unmask"), Unmask())


@pytest.fixture
def runtime():
    manager = make_plugin_manager(load_entry_points=False)
    manager.register(Plugin())
    registry = PolicyRegistry(manager)
    return rt.EntropyRuntime(8, torch.device("cpu"), ServerSettings.from_env({}), registry)


def resolve(runtime, entropy, n=1):
    return runtime.settings.resolve({"entropy": entropy}, runtime.registry, n=n, temperature=1.0)


def start(runtime, req, inherit=None):
    runtime.start(req, resolve(runtime, req.entropy), inherit)


# --- the request ---------------------------------------------------------------------------


def test_a_list_of_policies_is_validated_and_the_policy_that_forms_sequences_comes_first(runtime):
    both = [{"policy": "low", "params": {"limit": 2}}, {"policy": "fork", "params": {"max_sequences": 4}}]
    for entropy in (both, {"policies": both, "return_signals": ["entropy"]}):
        resolved = resolve(runtime, entropy)
        assert resolved.policies == ("fork", "low") and resolved.policy == "fork"
        assert resolved.params.max_sequences == 4 and resolved.composed[1][1].limit == 2
        assert resolved.label == ["fork", "low"]
    single = resolve(runtime, {"policy": "low"})
    assert single.policies == ("low",) and single.label == "low"


@pytest.mark.parametrize(
    "entropy, says",
    [
        ({"policy": "low", "policies": [{"policy": "high"}]}, "either one policy"),
        ([{"policy": "low"}, {"policy": "low"}], "twice"),
        ([{"policy": "fork"}, {"policy": "fork2"}], "fork sequences by two rules"),
        ([{"policy": "grouped"}, {"policy": "grouped2"}], "each run their own group"),
        ([{"policy": "low"}, {"policy": "unmask"}], "diffusion unmasking policy"),
        ([{"policy": "low"}, {"policy": "nope"}], "policies[1].policy: unknown policy 'nope'"),
        ([{"policy": "low", "params": {"limit": math.inf}}], "policies[0].params.limit"),
        ([{"policy": "low", "code": "x"}], "policies.0.code"),
        ([{"policy": "low"}] * 5, "policies"),
    ],
)
def test_a_composition_that_makes_no_sense_is_a_400_that_says_why(runtime, entropy, says):
    with pytest.raises(EntropyRequestError, match=r"custom_params\.entropy") as error:
        resolve(runtime, entropy)
    assert says in str(error.value)


def test_signal_settings_of_a_composition_come_from_the_policy_that_sets_them(runtime):
    windowed = {"policy": "windowed", "params": {"window_size": 16}}
    resolved = resolve(runtime, [{"policy": "low"}, windowed])
    assert resolved.window == 16  # set by one, left at the default by none other
    assert resolve(runtime, [windowed, {"policy": "windowed2"}]).window == 16  # the other keeps its default
    with pytest.raises(EntropyRequestError, match="windowed and windowed2 set params.window_size to 16 and 8"):
        resolve(runtime, [windowed, {"policy": "windowed2", "params": {"window_size": 8}}])


# --- the merged decisions --------------------------------------------------------------------


def flat_logits(rows: int, vocab=100):
    return torch.zeros(rows, vocab)  # entropy log(100) = 4.6 on every row


def test_a_row_stops_if_any_of_its_policies_stops_and_keeps_each_stop_event(runtime):
    both = FakeReq("both", 1, [{"policy": "low", "params": {"limit": 1}}, {"policy": "high", "params": {"limit": 2}}])
    one = FakeReq("one", 2, [{"policy": "low", "params": {"limit": 9}}, {"policy": "high", "params": {"limit": 3}}])
    none = FakeReq("none", 3, [{"policy": "low", "params": {"limit": 9}}, {"policy": "high", "params": {"limit": 9}}])
    for req in (both, one, none):
        start(runtime, req)
    run_step(runtime, [both, one, none], flat_logits(3))
    reason = both.finished_reason.to_json()
    assert reason["entropy_policy"] == "low" and reason["stopped_by"] == {"low": "above", "high": "over"}
    events = both.customized_info[protocol.EVENTS_KEY][0]
    assert [(e["policy"], e["reason"], e["limit"]) for e in events] == [("low", "above", 1), ("high", "over", 2)]
    reason = one.finished_reason.to_json()
    assert (reason["entropy_policy"], reason["reason"]) == ("high", "over") and "stopped_by" not in reason
    assert none.finished_reason is None and none.customized_info[protocol.EVENTS_KEY] == [None]


def test_logit_biases_add_and_the_largest_branch_width_wins(runtime):
    req = FakeReq(
        "r",
        1,
        [
            {"policy": "fork", "params": {"width": 1}},
            {"policy": "low", "params": {"limit": 9, "bias": 1.5}},
            {"policy": "high", "params": {"limit": 9, "bias": 2.0}},
            {"policy": "widen", "params": {"width": 3}},
        ],
    )
    start(runtime, req)
    logits = flat_logits(1)
    host = run_step(runtime, [req], logits)
    assert logits[0, 3] == 3.5 and logits[0, 4] == 0  # both biases, on the row's logits in place
    [row] = host.rows()
    assert row["branch_width"] == 3 and runtime.policies[int(row["brancher"])] == "widen"
    [event] = req.customized_info[protocol.EVENTS_KEY][0]
    assert (event["kind"], event["policy"], event["width"]) == ("branch", "widen", 3)
    assert "limit" not in event  # the other policies' values stay with their own events


def test_one_policy_failing_fails_only_its_requests(runtime, monkeypatch):
    def boom(step):
        raise RuntimeError("boom")

    monkeypatch.setattr(runtime.registry.policy("high"), "decode_step", boom)
    composed = FakeReq("composed", 1, [{"policy": "low", "params": {"limit": 9}}, {"policy": "high"}])
    alone = FakeReq("alone", 2, {"policy": "low", "params": {"limit": 9}})
    start(runtime, composed)
    start(runtime, alone)
    run_step(runtime, [composed, alone], flat_logits(2))
    assert "sglang-entropy (high) failed" in composed.finished_reason.message
    assert alone.finished_reason is None


def test_a_reason_a_policy_did_not_register_fails_the_request_naming_that_policy(runtime):
    req = FakeReq("r", 1, [{"policy": "low", "params": {"limit": 9}}, {"policy": "bad_reason"}])
    start(runtime, req)
    run_step(runtime, [req], flat_logits(1))
    assert "sglang-entropy (bad_reason) failed: IndexError" in req.finished_reason.message


# --- forked sequences inherit their parent's state -------------------------------------------------


def peaked_logits(peak: float, vocab=100):
    logits = torch.zeros(1, vocab)
    logits[0, 7] = peak
    return logits


def test_a_forked_child_continues_its_parent_window_and_state(runtime):
    policies = [{"policy": "fork", "params": {"width": 1}}, {"policy": "counter"}]
    entropy = {"policies": policies, "return_signals": ["confidence", "group_confidence"]}
    runtime.settings.config.signals.window_size = 4
    parent = FakeReq("parent", 1, entropy)
    start(runtime, parent)
    for peak in (1.0, 5.0, 9.0, 2.0):  # tokens 0 to 3 of the parent, each asking to fork
        run_step(runtime, [parent], peaked_logits(peak))
    confidence = parent.customized_info[protocol.SIGNAL_KEY + "confidence"]
    # the host forks at token 2 after the device already ran token 3 (SGLang's overlap
    # scheduler): the child's first token replaces the parent's token 2
    inherit = runtime.fork_state(runtime.records["parent"], 2)
    child = FakeReq("child", 2, entropy, prompt_len=5 + 2)
    start(runtime, child, inherit)
    # the parent's, before its token 2: the child samples that token again
    assert runtime.state[runtime.policies.index("counter")]["steps"][2] == 2
    for peak in (9.0, 3.0):  # the child's tokens 0 and 1 (window index 2 and 3)
        run_step(runtime, [child], peaked_logits(peak))
    child_confidence = child.customized_info[protocol.SIGNAL_KEY + "confidence"]
    group = child.customized_info[protocol.SIGNAL_KEY + "group_confidence"]
    trace = confidence[:2] + child_confidence  # the child's whole trace: the shared prefix, then its own
    assert group[0] == pytest.approx(sum(trace[:3]) / 3, rel=1e-5)
    assert group[1] == pytest.approx(sum(trace[:4]) / 4, rel=1e-5)
    assert runtime.state[runtime.policies.index("counter")]["steps"][2] == 4  # each token of its trace once
    # a fresh request in the same slot afterwards starts from nothing
    runtime.end(SimpleNamespace(rid="child", finished_reason=None, finished=lambda: True, is_retracted=False))
    fresh = FakeReq("fresh", 2, entropy)
    start(runtime, fresh)
    run_step(runtime, [fresh], peaked_logits(3.0))
    fresh_values = fresh.customized_info
    assert fresh_values[protocol.SIGNAL_KEY + "group_confidence"][0] == pytest.approx(
        fresh_values[protocol.SIGNAL_KEY + "confidence"][0], rel=1e-5
    )


def test_a_pruned_sequence_returns_its_share_of_the_budget():
    book = BranchBook(max_idle_pools=4)
    for rid in ("a", "b"):
        book.remember(None, SimpleNamespace(rid=rid), Forking(budget_group="g", budget=4))
    assert book.pools["g"] == 2
    book.forget("a", pruned=True)
    assert book.pools["g"] == 3  # a policy stopped it early: its sequence goes back to the pool
    book.forget("b")
    assert book.pools["g"] == 3  # finished normally: it keeps what it used


def test_the_frontend_rewrites_the_primary_policys_parameters_in_either_form():
    from sglang_entropy.settings import set_primary_params

    single = {"policy": "eager", "params": {"budget_group": "mine"}, "return_signals": ["entropy"]}
    assert set_primary_params(single, "eager", {"budget_group": "scoped"}) == {
        **single,
        "params": {"budget_group": "scoped"},
    }
    listed = [{"policy": "deepconf", "params": {"threshold": 5}}, {"policy": "eager"}]
    assert set_primary_params(listed, "eager", {"budget_group": "scoped"}) == {
        "policies": [listed[0], {"policy": "eager", "params": {"budget_group": "scoped"}}]
    }
    assert listed[1] == {"policy": "eager"}  # the request's own value is not changed


def test_a_composed_group_runs_each_trace_with_every_policy_and_the_groups_parameters():
    from sglang_entropy.adapter.frontend import groups
    from sglang_entropy.registry import installed_policies

    settings, registry = ServerSettings.from_env({}), installed_policies()
    entropy = {"policies": [{"policy": "echo"}, {"policy": "deepconf", "params": {"warmup_traces": 2}}]}
    options = settings.resolve({"entropy": entropy}, registry, n=4, temperature=0.7)
    assert options.policies == ("deepconf", "echo") and groups.forms_group(options, 4)
    group = groups.Group("g", options.policy, options.params)
    group.view.overrides = {"threshold": 5.5}  # what the warm-up calibrated
    obj = SimpleNamespace(sampling_params={"n": 4, "custom_params": {"entropy": entropy}})
    trace, _ = groups._trace_request(obj, "g-3", options, group)
    sent = trace.sampling_params["custom_params"]["entropy"]
    assert [p["policy"] for p in sent["policies"]] == ["deepconf", "echo"]
    assert sent["policies"][0]["params"]["threshold"] == 5.5 and sent["policies"][0]["params"]["group_id"] == "g"
    assert {"confidence", "entropy"} <= set(sent["return_signals"])  # what both policies read
    again = settings.resolve(trace.sampling_params["custom_params"], registry, n=1, temperature=0.7)
    assert again.params.threshold == 5.5 and again.policies == ("deepconf", "echo")
