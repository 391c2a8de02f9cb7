"""The adapter's runtime driven directly: slots, one decode step, stops, consume, release.

Requests are stand-ins with the fields the runtime reads from SGLang's ``Req``; the server
tests cover the same path inside the real scheduler.
"""

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from pydantic import Field
from sglang.srt.managers.auxiliary_output import CommittedTokens
from sglang.srt.managers.schedule_batch import FINISH_ABORT

from sglang_entropy import hookimpl
from sglang_entropy.adapter import protocol
from sglang_entropy.adapter.scheduler import runtime as rt
from sglang_entropy.registry import PolicyRegistry, make_plugin_manager
from sglang_entropy.settings import ServerSettings
from sglang_entropy.types import DecodeDecision, PolicyParams, PolicySpec


@dataclass
class FakeReq:
    rid: str
    slot: int
    entropy: dict
    prompt_len: int = 5
    output_ids: list = field(default_factory=list)
    customized_info: dict | None = None
    to_finish: object = None
    finished_reason: object = None
    is_retracted: bool = False

    def __post_init__(self):
        self.kv = SimpleNamespace(req_pool_idx=self.slot)
        self.sampling_params = SimpleNamespace(custom_params={"entropy": self.entropy})
        self.origin_input_ids = list(range(self.prompt_len))

    def finished(self):
        return self.finished_reason is not None


class Params(PolicyParams):
    limit: float = Field(1.0, ge=0, le=100)


class Cap:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def decode_step(self, step):
        if self.name == "broken":
            raise RuntimeError("boom")
        above = step.signals["entropy"] > step.params["limit"]
        return DecodeDecision(
            stop=above,
            stop_reason=(step.signals["entropy"] > 2 * step.params["limit"]).long(),
            event_values={"limit": step.params["limit"]},
        )

    def request_start(self, request, state):
        self.log.started.append((self.name, request.slot))

    def request_end(self, request, reason, state):
        self.log.ended.append((self.name, request.rid, reason))


class Plugin:
    @hookimpl
    def register_policies(self, register):
        spec = PolicySpec(name="cap", params=Params, stop_reasons=("above", "far_above"), signals=("entropy",))
        register(spec, Cap("cap", self))
        register(PolicySpec(name="broken", params=Params, signals=("confidence",)), Cap("broken", self))


@pytest.fixture
def plugin():
    p = Plugin()
    p.started, p.ended = [], []
    return p


@pytest.fixture
def runtime(plugin):
    manager = make_plugin_manager(load_entry_points=False)
    manager.register(plugin)
    return rt.EntropyRuntime(8, torch.device("cpu"), ServerSettings.from_env({}), PolicyRegistry(manager))


def start(runtime, req):
    """What the scheduler state does: resolve the request's options once, then start it."""
    runtime.start(req, runtime.settings.resolve(req.sampling_params.custom_params, runtime.registry))


def one_hot_logits(rows_peaked: list[bool], vocab=100):
    logits = torch.zeros(len(rows_peaked), vocab)
    for row, peaked in enumerate(rows_peaked):
        if peaked:
            logits[row, 7] = 50.0  # entropy ~ 0; the flat rows have entropy log(100) = 4.6
    return logits


def run_step(runtime, reqs, logits):
    slots = torch.tensor([r.slot for r in reqs])
    seq_lens = torch.tensor([r.prompt_len + len(r.output_ids) for r in reqs])
    host = runtime.step(logits, slots, seq_lens).copy_to_host(lambda t: t.clone())
    batch = SimpleNamespace(reqs=reqs)
    host.stops(batch)
    commits = []
    for req in reqs:  # SGLang commits one token per request, then finishes marked ones
        commits.append(CommittedTokens(len(req.output_ids), (7,)))
        req.output_ids.append(7)
        if req.to_finish is not None:
            req.finished_reason, req.to_finish = req.to_finish, None
    host.consume(batch, commits)
    return host


def test_stop_decision_finishes_exactly_that_request_with_its_reason(runtime, plugin):
    calm = FakeReq("calm", 1, {"policy": "cap", "params": {"limit": 3.0}, "return_signals": ["entropy"]})
    wild = FakeReq("wild", 2, {"policy": "cap", "params": {"limit": 1.0}, "return_signals": ["entropy"]})
    watcher = FakeReq("watcher", 3, {"return_signals": ["confidence"]})
    for req in (calm, wild, watcher):
        start(runtime, req)
    assert plugin.started == [("cap", 1), ("cap", 2)]  # the watcher has no policy
    run_step(runtime, [calm, wild, watcher], one_hot_logits([True, False, False]))
    assert calm.finished_reason is None and watcher.finished_reason is None
    reason = wild.finished_reason.to_json()
    assert (reason["type"], reason["entropy_policy"], reason["reason"], reason["token_index"]) == (
        "stop",
        "cap",
        "far_above",
        0,
    )
    [event] = wild.customized_info[protocol.EVENTS_KEY][0]
    assert event["kind"] == "stop" and event["limit"] == 1.0
    assert wild.customized_info[protocol.SIGNAL_KEY + "entropy"][0] == pytest.approx(4.605, abs=1e-3)
    assert calm.customized_info[protocol.EVENTS_KEY] == [None]
    assert protocol.SIGNAL_KEY + "entropy" not in watcher.customized_info  # it asked for confidence only


def test_a_raising_policy_fails_only_its_requests(runtime):
    fine = FakeReq("fine", 1, {"policy": "cap", "params": {"limit": 100.0}})
    doomed = FakeReq("doomed", 2, {"policy": "broken"})
    start(runtime, fine)
    start(runtime, doomed)
    run_step(runtime, [fine, doomed], one_hot_logits([False, False]))
    assert fine.finished_reason is None
    assert isinstance(doomed.finished_reason, FINISH_ABORT)
    assert "boom" in doomed.finished_reason.message


def test_release_frees_the_slot_and_reports_why(runtime, plugin):
    req = FakeReq("r", 4, {"policy": "cap", "return_signals": ["entropy", "varentropy"]})
    start(runtime, req)
    assert runtime.active[4] and runtime.signal_users["varentropy"] == 1
    req.finished_reason = FINISH_ABORT("client went away")
    runtime.end(req)
    assert not runtime.active[4] and not runtime.member[4].any()
    assert runtime.num_active == 0 and runtime.signal_users["varentropy"] == 0
    assert plugin.ended == [("cap", "r", "aborted")]


def test_full_vocabulary_signals_only_while_someone_needs_them(runtime):
    watcher = FakeReq("w", 1, {"return_signals": ["confidence"]})
    start(runtime, watcher)
    host = run_step(runtime, [watcher], one_hot_logits([False]))
    assert host.rows()[0]["entropy"] != host.rows()[0]["entropy"]  # nan: not computed
    curious = FakeReq("c", 2, {"return_signals": ["entropy"]})
    start(runtime, curious)
    host = run_step(runtime, [watcher, curious], one_hot_logits([False, False]))
    assert host.rows()[1]["entropy"] == pytest.approx(4.605, abs=1e-3)


def test_unfinished_prefill_chunks_are_not_recorded(runtime):
    req = FakeReq("chunked", 1, {"return_signals": ["confidence"]}, prompt_len=50)
    start(runtime, req)
    # a prefill chunk that covers only part of the prompt: its sampled token is thrown away
    host = runtime.step(one_hot_logits([False]), torch.tensor([1]), torch.tensor([20]))
    assert host.packed[0, rt.FIXED_COLUMNS.index("valid")] == 0


def test_invalid_options_reaching_the_scheduler_end_the_request_not_the_server(runtime, monkeypatch):
    from sglang_entropy.adapter.scheduler import hooks
    from sglang_entropy.adapter.scheduler.state import SchedulerState

    state = SchedulerState()
    state.runtime = runtime
    monkeypatch.setattr(hooks, "STATE", state)
    bad = FakeReq("bad", 1, {"policy": "deepconf", "params": {"threshold": "high"}})
    hooks.admit_request(None, SimpleNamespace(rid="bad", sampling_params=bad.sampling_params))
    hooks.start_requests(True, None, [bad])
    assert isinstance(bad.to_finish, FINISH_ABORT) and "custom_params.entropy.params.threshold" in bad.to_finish.message
    assert not runtime.active[1] and runtime.num_active == 0  # never served without its policy
    bad.finished_reason = bad.to_finish
    hooks.end_request(None, bad)
    assert state.report()["tracked_requests"] == 0


def test_a_failure_while_starting_a_request_ends_it_and_frees_its_slot(runtime, monkeypatch):
    class Unwritable(dict):
        def items(self):
            raise OverflowError("value does not fit")

    monkeypatch.setattr(runtime, "params", [Unwritable(p) for p in runtime.params])
    req = FakeReq("overflow", 3, {"policy": "cap", "params": {"limit": 2.0}})
    start(runtime, req)
    assert isinstance(req.to_finish, FINISH_ABORT) and "OverflowError" in req.to_finish.message
    assert not runtime.active[3] and not runtime.member[3].any() and runtime.num_active == 0
    other = FakeReq("other", 4, {"return_signals": ["entropy"]})
    start(runtime, other)  # the runtime goes on serving
    run_step(runtime, [other], one_hot_logits([False]))
    assert other.finished_reason is None


def test_a_stop_reason_the_policy_never_registered_fails_only_its_request():
    class BadReason:
        def decode_step(self, step):
            return DecodeDecision(stop=step.mask, stop_reason=torch.full_like(step.slots, 9))

    class Plugin:
        @hookimpl
        def register_policies(self, register):
            register(PolicySpec(name="cap", params=Params, stop_reasons=("above",)), BadReason())

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(Plugin())
    runtime = rt.EntropyRuntime(8, torch.device("cpu"), ServerSettings.from_env({}), PolicyRegistry(manager))
    req = FakeReq("r", 1, {"policy": "cap"})
    start(runtime, req)
    run_step(runtime, [req], one_hot_logits([False]))
    assert isinstance(req.finished_reason, FINISH_ABORT) and "IndexError" in req.finished_reason.message
