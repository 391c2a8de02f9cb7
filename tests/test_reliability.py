"""No request can crash, disable or silently bypass a policy (without a server: validation,
registration, group scoping and caps, branch bookkeeping). The same cases against the
launched server are in test_reliability_server.py."""

import asyncio
import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from sglang_entropy import hookimpl
from sglang_entropy.adapter.frontend import groups
from sglang_entropy.adapter.scheduler import branching
from sglang_entropy.registry import PolicyRegistry, installed_policies, make_plugin_manager
from sglang_entropy.settings import EntropyRequestError, Limits, ServerConfig, ServerSettings, load_config
from sglang_entropy.types import PolicyParams, PolicySpec


def server(**config) -> ServerSettings:
    return ServerSettings(enabled=True, allowed_policies=None, config=ServerConfig.model_validate(config))


def resolve(entropy, settings=None, **sampling):
    return (settings or server()).resolve({"entropy": entropy}, installed_policies(), **sampling)


def refused(entropy, field, settings=None, **sampling):
    with pytest.raises(EntropyRequestError) as error:
        resolve(entropy, settings, **sampling)
    assert str(error.value).startswith(field), str(error.value)
    return str(error.value)


# --- numbers a request may set --------------------------------------------------------------


@pytest.mark.parametrize(
    "entropy, field",
    [
        ({"policy": "deepconf", "params": {"threshold": 1.0, "min_votes": 10**19}}, "params.min_votes"),
        ({"policy": "deepconf", "params": {"warmup_traces": 10**19, "group_id": "g"}}, "params.warmup_traces"),
        ({"policy": "deepconf", "params": {"threshold": 1.0, "window_size": 10**19}}, "params.window_size"),
        ({"policy": "eager", "params": {"budget_group": "g", "budget": 10**19}}, "params.budget"),
        ({"policy": "echo", "params": {"window_size": 2**63}}, "params.window_size"),
    ],
)
def test_integers_beyond_the_device_buffers_are_refused(entropy, field):
    refused(entropy, f"custom_params.entropy.{field}", temperature=0.7)


@pytest.mark.parametrize("value", ["NaN", "nan", "Infinity", "-inf", float("nan"), float("inf"), 1e300])
@pytest.mark.parametrize(
    "policy, field", [("deepconf", "threshold"), ("eager", "threshold"), ("echo", "min_group_confidence")]
)
def test_values_that_would_silently_disable_a_policy_are_refused(policy, field, value):
    refused({"policy": policy, "params": {field: value}}, f"custom_params.entropy.params.{field}", temperature=0.7)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1e-7}, {"temperature": 0.7, "top_k": 1}])
def test_eager_refuses_what_sglang_decodes_greedily(sampling):
    message = refused({"policy": "eager"}, "custom_params.entropy.params", **sampling)
    assert "temperature > 0" in message
    assert resolve({"policy": "eager"}, temperature=1e-6).policy == "eager"  # SGLang samples at 1e-6


def test_sglang_greedy_cut_off_is_the_one_the_adapter_uses():
    from sglang.srt.sampling import sampling_params

    from sglang_entropy.settings import SAMPLING_EPS

    assert sampling_params._SAMPLING_EPS == SAMPLING_EPS


def test_a_fixed_threshold_group_keeps_its_policy_when_the_scheduler_validates_it_again():
    grouped = resolve({"policy": "deepconf", "params": {"threshold": 3.0}}, n=4)
    assert grouped.params.warmup_traces == 0
    # what the tokenizer manager sends to the scheduler for each trace, validated there once more
    trace = grouped.params.model_dump(exclude_none=True) | {"group_id": "g"}
    assert resolve({"policy": "deepconf", "params": trace}).params.threshold == 3.0
    refused({"policy": "deepconf", "params": {"warmup_traces": 0}}, "custom_params.entropy.params", n=4)


def test_sequences_per_request_are_capped_by_the_server():
    capped = server(limits={"max_sequences": 8})
    assert "[limits] max_sequences" in refused({"policy": "deepconf"}, "sampling_params.n", capped, n=9)
    assert resolve({"policy": "deepconf"}, capped, n=8).policy == "deepconf"
    refused(
        {"policy": "eager", "params": {"max_sequences": 9}},
        "custom_params.entropy.params.max_sequences",
        capped,
        temperature=0.7,
    )
    refused({"policy": "eager"}, "sampling_params.n", temperature=0.7, n=2)


def test_error_messages_are_bounded():
    message = refused({"policy": "deepconf", "params": {f"k{i}": 1 for i in range(60)}}, "custom_params.entropy")
    assert message.endswith("more problems") and message.count(";") == 5
    assert len(refused({"policy": "x" * 100_000}, "custom_params.entropy.policy")) < 500
    message = refused({"policy": "deepconf", "params": {"threshold": 1, "k" * 100_000: 1}}, "custom_params.entropy")
    assert len(message) < 500


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = sorted({name for p in installed_policies() for name in p.spec.params.model_fields} | {"bogus"})


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from([None, "deepconf", "eager", "echo", "taps", "ccd", "nope"]) | JSON,
    params=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4) | JSON,
    extra=st.dictionaries(st.sampled_from(["return_signals", "dllm_trace", "code"]), JSON, max_size=2),
    n=st.integers(-2, 70) | JSON,
    temperature=st.floats(allow_nan=True) | st.none(),
)
def test_any_request_object_resolves_or_is_refused_by_name(policy, params, extra, n, temperature):
    entropy = {"policy": policy, "params": params, **extra}
    try:
        resolved = server().resolve(
            {"entropy": entropy}, installed_policies(), n=n if isinstance(n, int) else 1, temperature=temperature
        )
    except EntropyRequestError as e:
        assert str(e).startswith(("custom_params.entropy", "sampling_params.n")) and len(str(e)) < 2000
        return
    if resolved is not None and resolved.params is not None:  # what the scheduler writes must fit its buffers
        for value in resolved.params.model_dump().values():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert abs(value) <= 2**62


# --- registration ---------------------------------------------------------------------------


class Unbounded(PolicyParams):
    limit: int = Field(1, ge=0)


class NoMaxLength(PolicyParams):
    name: str = "x"


class Nested(PolicyParams):
    weights: list[float] = Field(default_factory=list)


class LooseModel(BaseModel):
    limit: float = Field(1.0, ge=0, le=1)


@pytest.mark.parametrize(
    "params, problem",
    [
        (Unbounded, "lower and an upper bound"),
        (NoMaxLength, "max_length"),
        (Nested, "parameters are numbers"),
        (LooseModel, "must extend"),
    ],
)
def test_registration_refuses_parameters_a_request_could_overflow(params, problem):
    class Plugin:
        @hookimpl
        def register_policies(self, register):
            register(PolicySpec(name="loose", params=params), SimpleNamespace(decode_step=print))

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(Plugin())
    with pytest.raises(ValueError, match=problem):
        PolicyRegistry(manager)


# --- the server's configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    "config, named",
    [
        ({"policies": {"deepconf": {"threshold": "abc"}}}, "policies.deepconf.threshold"),
        ({"policies": {"deepconf": {"threshold": "nan"}}}, "policies.deepconf.threshold"),
        ({"policies": {"deepconf": {"bogus": 1}}}, "policies.deepconf.bogus"),
        ({"policies": {"nope": {}}}, "policies.nope"),
        ({"policies": {"eager": {"max_sequences": 10**6}}}, "policies.eager.max_sequences"),
    ],
)
def test_bad_policy_defaults_are_a_launch_error(tmp_path, config, named):
    path = tmp_path / "entropy.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        ServerSettings(enabled=True, allowed_policies=None, config=load_config(path)).check(installed_policies())


def test_limits_and_group_scope_are_read_from_the_config(tmp_path):
    path = tmp_path / "entropy.toml"
    path.write_text('[limits]\nmax_sequences = 8\nmax_groups = 4\n\n[groups]\nclient_header = "x-user"\n')
    config = load_config(path)
    assert (config.limits.max_sequences, config.limits.max_groups, config.groups.client_header) == (8, 4, "x-user")


# --- group names are private to a client ----------------------------------------------------


def request_with(headers: dict):
    return SimpleNamespace(headers=headers)


def test_group_names_are_scoped_by_the_client_header():
    scope = ServerConfig().groups
    params = SimpleNamespace(group_id="shared")
    alice = groups.client_scope(request_with({"authorization": "Bearer alice"}), scope, "group_id", params)
    bob = groups.client_scope(request_with({"authorization": "Bearer bob"}), scope, "group_id", params)
    assert groups.scoped_name(alice, "shared") != groups.scoped_name(bob, "shared")
    assert groups.scoped_name(alice, "shared") == groups.scoped_name(alice, "shared")
    assert len(groups.scoped_name(alice, "x" * 128)) <= 128  # still a valid name for the scheduler
    strict = ServerConfig.model_validate({"groups": {"require_client_header": True}}).groups
    with pytest.raises(EntropyRequestError, match="authorization"):
        groups.client_scope(request_with({}), strict, "group_id", params)
    groups.client_scope(request_with({}), strict, "group_id", SimpleNamespace(group_id=None))  # no name: no need


def test_named_groups_in_use_are_capped_and_idle_ones_forgotten():
    book = groups.GroupBook(Limits(max_groups=2))
    params = SimpleNamespace(warmup_traces=1)
    first = book.named_group("a", "a", "deepconf", params)
    first.requests += 1
    second = book.named_group("b", "b", "deepconf", params)
    second.requests += 1
    assert book.named_group("a", "a", "deepconf", params) is first  # joining a group in use
    with pytest.raises(EntropyRequestError, match=r"max_groups"):
        book.named_group("c", "c", "deepconf", params)
    second.requests -= 1
    book.named_group("c", "c", "deepconf", params)  # b is idle now: c takes its place
    assert set(book.named) == {"deepconf:a", "deepconf:c"}


def test_a_budget_group_is_sent_to_the_scheduler_under_its_scoped_name():
    book = groups.GroupBook(Limits(max_groups=1))
    entropy = {"policy": "eager", "params": {"budget_group": "pool", "budget": 3}}
    options = resolve(entropy, temperature=0.7)
    obj = SimpleNamespace(sampling_params={"temperature": 0.7, "custom_params": {"entropy": entropy}})

    async def run():
        async with book.budget_group(obj, options, "scope-a"):
            sent = obj.sampling_params["custom_params"]["entropy"]["params"]["budget_group"]
            assert sent == groups.scoped_name("scope-a", "pool")
            other = SimpleNamespace(sampling_params={"custom_params": {"entropy": entropy}})
            with pytest.raises(EntropyRequestError, match="max_groups"):
                async with book.budget_group(other, options, "scope-b"):
                    pass
        assert not book.budgets

    asyncio.run(run())
    assert entropy["params"]["budget_group"] == "pool"  # the client's own object is left as it was


# --- branch bookkeeping ---------------------------------------------------------------------


def eager_request(rid, **params):
    custom = {"entropy": {"policy": "eager", "params": params}}
    return SimpleNamespace(rid=rid, sampling_params=SimpleNamespace(custom_params=custom))


def eager_params(**params):
    return installed_policies().get("eager").spec.params(**params)


def test_budget_pools_in_use_are_never_forgotten():
    book = branching.BranchBook(max_idle_pools=2)
    for i in range(4):
        book.remember(None, eager_request(f"r{i}"), eager_params(budget_group=f"g{i}", budget=3))
    assert list(book.pools) == ["g0", "g1", "g2", "g3"]  # all in use: none forgotten
    assert book.pools["g0"] == 2  # the first sequence took one
    for i in range(4):
        book.forget(f"r{i}")
    book.remember(None, eager_request("r4"), eager_params(budget_group="g4", budget=3))
    assert list(book.pools) == ["g3", "g4"]  # idle pools beyond the limit, oldest first
    assert book.report() == {
        "branching_requests": 1,
        "tracked_sequences": 1,
        "inherited_states": 0,
        "budget_pools_in_use": 1,
    }


def test_a_request_aborted_while_queued_leaves_no_bookkeeping(monkeypatch):
    from sglang_entropy.adapter.scheduler import hooks
    from sglang_entropy.adapter.scheduler.state import SchedulerState

    state = SchedulerState()
    monkeypatch.setattr(hooks, "STATE", state)
    hooks.admit_request(None, eager_request("queued", budget_group="g", budget=2))
    assert state.branches.report()["tracked_sequences"] == 1 and state.report()["tracked_requests"] == 1
    hooks.forget_unqueued(None, None, SimpleNamespace(rid="queued"))
    assert state.branches.report() == {
        "branching_requests": 0,
        "tracked_sequences": 0,
        "inherited_states": 0,
        "budget_pools_in_use": 0,
    }
    assert state.report()["tracked_requests"] == 0
    state.forget("queued")  # SGLang may also free it later: nothing is counted twice
    assert state.branches.report()["branching_requests"] == 0


def test_a_failing_fork_ends_its_own_request_and_reports_the_children_it_made():
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    queued = []

    def handle_generate_request(child):
        if queued:
            raise RuntimeError("queue full")
        queued.append(child.rid)

    scheduler = SimpleNamespace(
        tree_cache=SimpleNamespace(checkpoint=lambda req, up_to: None), handle_generate_request=handle_generate_request
    )
    book = branching.BranchBook(max_idle_pools=2)
    params = eager_params(max_sequences=4, budget_group="g", budget=8)
    recv = eager_request("root")
    recv.sampling_params.max_new_tokens = 16
    book.remember(scheduler, recv, params)
    runtime = SimpleNamespace(
        records={"root": SimpleNamespace(resolved=SimpleNamespace(params=params))},
        children={},
        fork_state=lambda *a: None,
    )
    req = SimpleNamespace(rid="root", origin_input_ids=[1, 2], output_ids=[3], to_finish=None, finished=lambda: False)
    req.refresh_fill_ids = lambda: None
    host = SimpleNamespace(rows=lambda: [{"branch_width": 2.0, "valid": 1.0, "token_index": 1.0}])
    book.fork_rows(SimpleNamespace(reqs=[req]), host, runtime)
    assert isinstance(req.to_finish, FINISH_ABORT) and "queue full" in req.to_finish.message
    assert runtime.children[("root", 1)] == queued == ["root-b1"]  # the response names the child that runs
    assert book.pools["g"] == 8 - 1 - 1
    for rid in ("root", "root-b1"):
        book.forget(rid)
    assert book.report() == {
        "branching_requests": 0,
        "tracked_sequences": 0,
        "inherited_states": 0,
        "budget_pools_in_use": 0,
    }
