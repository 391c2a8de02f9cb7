"""End to end: no request can crash, disable or silently bypass a policy, group names are
private to each client, aborted groups and branches leave nothing behind, and a bad
configuration stops the launch. Against the session's real server (SmolLM2-135M-Instruct; its
config sets deepconf's window to 8 tokens and at most 32 sequences per request)."""

import json
import subprocess
import threading
import time
import uuid

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_entropy.registry import installed_policies
from sglang_entropy.testing import entropy_state, used_tokens
from sglang_entropy.tools import server as sglang_server

pytestmark = pytest.mark.server
WINDOW = 8


def post(server, path, body, headers=None, timeout=600):
    return requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=timeout)


def generate(server, entropy, text="What is 3 + 4?", headers=None, **sampling):
    sampling_params = {"max_new_tokens": 8, "temperature": 0.7, **sampling, "custom_params": {"entropy": entropy}}
    return post(server, "/generate", {"text": text, "sampling_params": sampling_params}, headers)


def assert_healthy_and_idle(server):
    assert requests.get(f"{server.url}/health", timeout=60).status_code == 200
    response = generate(server, {"return_signals": ["entropy"]}, max_new_tokens=4, ignore_eos=True)
    assert response.status_code == 200 and len(response.json()["meta_info"]["entropy"]["signals"]["entropy"]) == 4
    state = entropy_state(server)
    assert state["active_requests"] == 0 and state["active_slots"] == 0, state
    assert state["branching_requests"] == state["tracked_sequences"] == state["inherited_states"] == 0, state
    assert state["tracked_requests"] == 0 and state["budget_pools_in_use"] == 0, state


def assert_400(response, *named):
    assert response.status_code == 400, response.text[:500]
    message = response.json().get("error", response.json()).get("message", "")
    for text in named:
        assert text in message, message
    return message


def test_parameters_that_crashed_the_scheduler_get_400(entropy_server):
    for entropy, field in [
        ({"policy": "deepconf", "params": {"threshold": 1.0, "min_votes": 10**19}}, "params.min_votes"),
        ({"policy": "deepconf", "params": {"warmup_traces": 10**19, "group_id": "g"}}, "params.warmup_traces"),
        ({"policy": "echo", "params": {"window_size": 2**63}}, "params.window_size"),
        ({"policy": "eager", "params": {"budget_group": "g", "budget": 10**19}}, "params.budget"),
    ]:
        assert_400(generate(entropy_server, entropy), f"custom_params.entropy.{field}")
    assert_healthy_and_idle(entropy_server)


def test_forms_a_request_of_several_sequences_cannot_take_get_400(entropy_server):
    eager = {"custom_params": {"entropy": {"policy": "eager"}}}
    chat = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0.7}
    completion = {"model": "default", "prompt": "Hi", "max_tokens": 4, "temperature": 0.7}
    sampling = {"max_new_tokens": 4, "temperature": 0.7, **eager}
    cases = [
        ("/generate", {"text": ["Hi", "Yo"], "sampling_params": sampling}, "one prompt"),
        ("/generate", {"text": "Hi", "sampling_params": {**sampling, "n": 2}}, "sampling_params.n"),
        ("/generate", {"text": "Hi", "sampling_params": [sampling]}, "one set of sampling_params"),
        ("/generate", {"text": ["Hi", "Yo"], "sampling_params": [sampling, sampling]}, "one prompt"),
        ("/v1/completions", {**completion, **eager, "prompt": ["Hi", "Yo"]}, "one prompt"),
        ("/v1/completions", {**completion, **eager, "n": 2}, "sampling_params.n"),
        ("/v1/chat/completions", {**chat, **eager, "n": 2}, "sampling_params.n"),
    ]
    for path, body, named in cases:
        assert_400(post(entropy_server, path, body, timeout=60), named)
    assert_healthy_and_idle(entropy_server)


@pytest.mark.parametrize(
    "policy, field", [("deepconf", "threshold"), ("eager", "threshold"), ("echo", "min_group_confidence")]
)
def test_values_that_would_disable_a_policy_get_400(entropy_server, policy, field):
    for value in ("NaN", "Infinity", "-inf"):
        assert_400(generate(entropy_server, {"policy": policy, "params": {field: value}}), f"params.{field}")
    # the JSON literals NaN and Infinity too (Python's json writes them)
    body = {"text": "Hi", "sampling_params": {"temperature": 0.7, "custom_params": {"entropy": {"policy": policy}}}}
    body["sampling_params"]["custom_params"]["entropy"]["params"] = {field: float("nan")}
    response = requests.post(
        f"{entropy_server.url}/generate", data=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400


def test_eager_at_a_temperature_sglang_decodes_greedily_gets_400(entropy_server):
    assert_400(generate(entropy_server, {"policy": "eager"}, temperature=1e-7), "temperature > 0")
    assert_400(generate(entropy_server, {"policy": "eager"}, top_k=1), "top_k != 1")


def test_a_group_with_a_fixed_threshold_runs_its_policy(entropy_server):
    """Above every confidence (100), each trace stops where its first window fills."""
    for params, n in (({"threshold": 100.0}, 3), ({"threshold": 100.0, "group_id": uuid.uuid4().hex}, 2)):
        response = generate(
            entropy_server, {"policy": "deepconf", "params": params}, n=n, max_new_tokens=32, ignore_eos=True
        )
        outputs = response.json()
        outputs = outputs if isinstance(outputs, list) else [outputs]
        assert len(outputs) == n
        for output in outputs:
            meta = output["meta_info"]
            assert meta["finish_reason"]["entropy_policy"] == "deepconf"
            assert meta["completion_tokens"] == WINDOW
            assert meta["entropy"]["group"]["threshold"] == 100.0


def test_error_bodies_are_capped(entropy_server):
    many = {"policy": "deepconf", "params": {f"unknown_{i}": 1 for i in range(60_000)}}
    response = generate(entropy_server, many)
    assert_400(response, "custom_params.entropy.params")
    assert len(response.content) < 2000
    response = generate(
        entropy_server, {"policy": "deepconf", "params": {"threshold": 1, **{f"k{i}": 1 for i in range(40)}}}
    )
    assert "more problems" in assert_400(response) and len(response.content) < 2000


def test_too_many_sequences_per_request_get_400(entropy_server):
    assert_400(generate(entropy_server, {"policy": "deepconf"}, n=33), "sampling_params.n", "max_sequences")
    assert_400(
        generate(entropy_server, {"policy": "eager", "params": {"max_sequences": 33}}),
        "custom_params.entropy.params.max_sequences",
    )
    client = openai.OpenAI(base_url=f"{entropy_server.url}/v1", api_key="none")
    with pytest.raises(openai.BadRequestError, match="max_sequences"):
        client.completions.create(
            model="default",
            prompt="Hi",
            max_tokens=2,
            n=33,
            extra_body={"custom_params": {"entropy": {"policy": "deepconf"}}},
        )


def role(server, group_id, client):
    params = {"group_id": group_id, "warmup_traces": 1}
    response = generate(server, {"policy": "deepconf", "params": params}, headers={"Authorization": f"Bearer {client}"})
    assert response.status_code == 200, response.text
    group = response.json()["meta_info"]["entropy"]["group"]
    assert group["id"] == group_id  # each client sees its own name
    return group["role"]


def test_group_ids_are_private_to_each_client(entropy_server):
    group_id = uuid.uuid4().hex
    assert role(entropy_server, group_id, "alice") == "warmup"
    assert role(entropy_server, group_id, "bob") == "warmup"  # bob's own group, not alice's
    assert role(entropy_server, group_id, "alice") == "calibrated"


def sequences(server, params, client):
    response = generate(
        server,
        {"policy": "eager", "params": params},
        text="Write one word.",
        headers={"Authorization": f"Bearer {client}"},
        max_new_tokens=12,
    )
    assert response.status_code == 200, response.text
    return len(response.json())


def test_budget_groups_are_private_to_each_client(entropy_server):
    name = uuid.uuid4().hex
    spent = {"threshold": 0.0, "max_sequences": 4, "budget_group": name, "budget": 1}
    assert sequences(entropy_server, spent, "alice") == 1  # the first sequence took alice's whole budget
    assert sequences(entropy_server, spent, "alice") == 1
    # at threshold 0 every token wants to fork: bob's pool of 4 under the same name is his own
    assert sequences(entropy_server, {**spent, "budget": 4}, "bob") == 4
    assert_healthy_and_idle(entropy_server)


def test_aborted_groups_and_branches_leave_the_server_idle(entropy_server):
    baseline = used_tokens(entropy_server)
    long_prompt = " ".join(["Count the sheep in the field and describe each one."] * 250)
    rids, results = [], []
    jobs = [
        ({"policy": "eager", "params": {"threshold": 0.5, "max_sequences": 4}}, "What is 3 + 4?", {}),
        ({"policy": "deepconf", "params": {"warmup_traces": 2}}, "What is 3 + 4?", {"n": 6}),
        *[({"policy": "eager", "params": {"threshold": 0.5, "max_sequences": 3}}, long_prompt, {}) for _ in range(6)],
    ]

    def run(entropy, text, sampling, rid):
        body = {
            "rid": rid,
            "text": text,
            "sampling_params": {
                "max_new_tokens": 2000,
                "ignore_eos": True,
                "temperature": 0.7,
                **sampling,
                "custom_params": {"entropy": entropy},
            },
        }
        results.append(post(entropy_server, "/generate", body).status_code)

    threads = []
    for entropy, text, sampling in jobs:
        rids.append(f"abort-{uuid.uuid4().hex}")
        threads.append(threading.Thread(target=run, args=(entropy, text, sampling, rids[-1])))
        threads[-1].start()
    deadline = time.time() + 120
    while entropy_state(entropy_server)["active_requests"] < 3:
        assert time.time() < deadline, "nothing started"
        time.sleep(0.2)
    for rid in reversed(rids):  # the long prompts, likely still queued, first
        requests.post(f"{entropy_server.url}/abort_request", json={"rid": rid}, timeout=60).raise_for_status()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive()
    assert all(code == 200 for code in results), results
    assert_healthy_and_idle(entropy_server)
    assert used_tokens(entropy_server) == baseline


# --- fuzzing the request object at the HTTP boundary ------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["NaN", "Infinity", "-inf", "", "x" * 300, "1e400"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=2),
    max_leaves=5,
)
FIELDS = sorted({name for p in installed_policies() for name in p.spec.params.model_fields} | {"unknown"})
ENTROPY = (
    st.fixed_dictionaries(
        {},
        optional={
            "policy": st.sampled_from(["deepconf", "eager", "echo", "taps", "ccd", "nope"]) | VALUES,
            "params": st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4) | VALUES,
            "return_signals": st.lists(st.sampled_from(["entropy", "confidence", "margin", "bogus"]), max_size=3)
            | VALUES,
            "dllm_trace": VALUES,
            "code": VALUES,
        },
    )
    | VALUES
)
SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "n": st.sampled_from([1, 2]),
        "temperature": st.sampled_from([0.0, 0.7]),
        "top_k": st.sampled_from([1, 20]),
    },
)
NOT_STARTED = "the group was stopped before this trace started"


def fuzz_request(server, endpoint, entropy, sampling, stream):
    custom = {"entropy": entropy}
    if endpoint == "/generate":
        body = {
            "text": "Hi",
            "stream": stream,
            "sampling_params": {"max_new_tokens": 2, **sampling, "custom_params": custom},
        }
    else:
        body = {"model": "default", "max_tokens": 2, "stream": stream, **sampling, "custom_params": custom}
        body.update(
            {"prompt": "Hi"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
        )
    return post(server, endpoint, body, timeout=300)


def assert_no_failure(response, stream):
    """A 200 carries no server error: no abort (except a group's traces it never started)."""
    text = response.text
    assert "Traceback" not in text and "sglang-entropy (" not in text, text[:1000]
    if stream:
        for line in text.splitlines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk or chunk["error"].get("code", 400) < 500, line
        return
    body = response.json()
    outputs = body if isinstance(body, list) else [body]
    for output in outputs:
        finish = (output.get("meta_info") or {}).get("finish_reason") or {}
        if finish.get("type") == "abort":
            assert finish.get("message") == NOT_STARTED, finish


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    endpoint=st.sampled_from(["/generate", "/v1/completions", "/v1/chat/completions"]),
    entropy=ENTROPY,
    sampling=SAMPLING,
    stream=st.booleans(),
)
def test_any_request_object_gets_200_or_400_and_the_server_stays_healthy(
    entropy_server, endpoint, entropy, sampling, stream
):
    response = fuzz_request(entropy_server, endpoint, entropy, sampling, stream)
    assert response.status_code in (200, 400), (response.status_code, response.text[:1000])
    if response.status_code == 200:
        assert_no_failure(response, stream)
    else:
        assert len(response.content) < 4000


def test_the_server_is_healthy_and_idle_after_the_fuzzing(entropy_server):
    assert_healthy_and_idle(entropy_server)


# --- a bad configuration stops the launch -----------------------------------------------------


def launch_fails(model_path, args, env=None) -> tuple[int, str]:
    port = sglang_server.free_port()
    command = sglang_server.server_command(model_path, port, enable_entropy=False, extra_args=args)
    done = subprocess.run(command, env=sglang_server.server_env(env), capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else ""


def test_a_bad_configuration_stops_the_launch_before_the_model_loads(model_path, tmp_path):
    bad = tmp_path / "entropy.toml"
    bad.write_text('[policies.deepconf]\nthreshold = "abc"\n')
    code, last = launch_fails(model_path, ["--enable-entropy", "--entropy-config", str(bad)])
    assert code != 0 and "policies.deepconf.threshold" in last, last
    # enabled by the environment, without any flag
    code, last = launch_fails(model_path, [], {"SGLANG_ENTROPY_ENABLE": "1", "SGLANG_ENTROPY_CONFIG": str(bad)})
    assert code != 0 and "policies.deepconf.threshold" in last, last
    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text("[signals]\nwindow_sise = 4\n")
    code, last = launch_fails(model_path, [], {"SGLANG_ENTROPY_ENABLE": "1", "SGLANG_ENTROPY_CONFIG": str(misspelt)})
    assert (
        code == 1
        and last
        == f"sglang-entropy: SGLANG_ENTROPY_CONFIG={misspelt}: signals.window_sise: Extra inputs are not permitted"
    ), last
    code, last = launch_fails(model_path, ["--enable-entropy", "--entropy-policies", "deepconf,no-such-policy"])
    assert code != 0 and "no-such-policy" in last, last
    # a decode policy named for a server that runs no decode steps
    speculative = sglang_server.standalone_args(model_path, 2)
    code, last = launch_fails(model_path, ["--enable-entropy", "--entropy-policies", "deepconf", *speculative])
    assert code != 0 and "--speculative-algorithm STANDALONE runs no decode steps" in last, last
    # drafters to route without SGLang's STANDALONE speculative decoding
    code, last = launch_fails(model_path, ["--enable-entropy", "--entropy-drafters", f"{model_path},{model_path}"])
    assert code != 0 and "--speculative-algorithm STANDALONE" in last, last
