"""Units of the adapter without a server: launch flags, a group's admission and release."""

import argparse
import asyncio
import json
import os

import pytest

from sglang_entropy.adapter import flags
from sglang_entropy.adapter.frontend.groups import Group


def parser():
    p = argparse.ArgumentParser()
    flags.add_flags(None, p)
    return p


@pytest.fixture
def clean_env(monkeypatch):
    """The flags write the environment; the test leaves it as it found it (servers launched
    later in the session inherit it)."""
    for name in ("SGLANG_ENTROPY_CONFIG", "SGLANG_ENTROPY_POLICIES", "SGLANG_ENTROPY_DRAFTERS"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_flags_set_the_environment_the_subprocesses_read(tmp_path, clean_env):
    config = tmp_path / "entropy.json"
    config.write_text(json.dumps({"policies": {"deepconf": {"window_size": 8}}}))
    parser().parse_args(["--entropy-policies", "deepconf,eager", "--entropy-config", str(config)])
    assert os.environ["SGLANG_ENTROPY_POLICIES"] == "deepconf,eager"
    assert os.environ["SGLANG_ENTROPY_CONFIG"] == str(config)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--entropy-policies", "deepconf,nope"], "nope"),
        (["--entropy-drafters", "only-one"], "two or more"),
    ],
)
def test_bad_flags_stop_the_parse_with_the_reason(argv, named, capsys, clean_env):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    assert exit_.value.code != 0
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_bad_config_file_stops_the_parse(tmp_path, capsys, clean_env):
    config = tmp_path / "entropy.toml"
    config.write_text('[policies.deepconf]\nthreshold = "abc"\n')
    with pytest.raises(SystemExit):
        parser().parse_args(["--entropy-config", str(config)])
    assert "policies.deepconf.threshold" in capsys.readouterr().err.strip().splitlines()[-1]
    assert "SGLANG_ENTROPY_CONFIG" not in os.environ  # nothing half-set


def test_a_groups_warmup_traces_run_first_and_an_aborted_one_hands_over_its_place():
    async def run():
        group = Group("g", "deepconf", type("P", (), {"warmup_traces": 2})())
        first, second = await group.admit(), await group.admit()
        assert (first, second) == ("warmup", "warmup")
        third = asyncio.create_task(group.admit())
        await asyncio.sleep(0)
        assert not third.done()  # waits for the warm-up
        await group.release("warmup", aborted=True)  # its place goes to the waiting trace
        assert await third == "warmup"
        await group.release("warmup", aborted=False)
        await group.release("warmup", aborted=False)
        assert await group.admit() == "calibrated"
        group.stopped = True
        assert await group.admit() is None

    asyncio.run(run())


def test_the_dashboard_plots_only_metrics_the_adapter_exports():
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY

    from sglang_entropy.adapter.metrics import Metrics, NoMetrics

    Metrics({"model_name": "m"})  # registers the adapter's metrics in this process
    exported = {sample for family in REGISTRY.collect() for sample in _sample_names(family)}
    dashboard = (Path(__file__).parents[1] / "examples/monitoring/sglang-entropy-dashboard.json").read_text()
    plotted = set(re.findall(r"sglang:entropy_\w+", dashboard))
    assert plotted and plotted <= exported, plotted - exported
    NoMetrics().stop("deepconf", "low", 3)  # off: any event is a no-op


def _sample_names(family):
    name = family.name
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
    return [name + suffix for suffix in suffixes]


def test_the_launcher_binds_ranks_to_cores_and_waits_for_tokenizer_workers(monkeypatch):
    from sglang_entropy.tools.server import cpu_scale_out_env

    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert cpu_scale_out_env(["--dp-size", "2"]) == {"SGLANG_CPU_OMP_THREADS_BIND": "0-1|2-3"}
    assert cpu_scale_out_env(["--dp-size", "2", "--tp-size", "2"]) == {"SGLANG_CPU_OMP_THREADS_BIND": "0|1|2|3"}
    assert cpu_scale_out_env(["--tokenizer-worker-num", "2"]) == {"SGLANG_UVICORN_WORKER_HEALTHCHECK_TIMEOUT": "180"}
    assert cpu_scale_out_env([]) == {}


# A stand-in server: binds its port like SGLang does (failing with SGLang's message when it is
# taken) and answers the readiness probe.
STAND_IN_SERVER = """
import http.server, sys
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
try:
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ready)
except OSError as e:
    sys.exit(f"ERROR: [Errno 98] error while attempting to bind: {e}")
server.serve_forever()
"""


def test_a_server_whose_port_was_taken_meanwhile_starts_again_on_another(monkeypatch):
    import socket
    import sys

    import requests

    from sglang_entropy.tools import server as launcher

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1], launcher.free_port()])
        monkeypatch.setattr(launcher, "free_port", lambda: next(picks))
        started = []

        def command(port):
            started.append(port)
            return [sys.executable, "-c", STAND_IN_SERVER, str(port)]

        with launcher._running(command, None, "stand-in", 60, None) as server:
            assert requests.get(f"{server.url}/health_generate", timeout=10).status_code == 200
        assert started[0] == taken.getsockname()[1] and server.url.endswith(f":{started[1]}")
        assert server.process.poll() is not None  # stopped on leaving


def test_a_server_that_fails_for_another_reason_is_not_started_again(monkeypatch):
    import sys

    from sglang_entropy.tools import server as launcher

    started = []

    def command(port):
        started.append(port)
        return [sys.executable, "-c", "import sys; sys.exit('ERROR: the model is broken')"]

    with pytest.raises(RuntimeError, match="the model is broken"):
        with launcher._running(command, None, "stand-in", 60, None):
            pass
    assert len(started) == 1


def test_named_groups_are_refused_where_tokenizer_workers_would_split_them(monkeypatch):
    from sglang_entropy.adapter.frontend import serving
    from sglang_entropy.registry import installed_policies
    from sglang_entropy.settings import EntropyRequestError, ServerConfig, ServerSettings

    settings = ServerSettings(enabled=True, allowed_policies=None, config=ServerConfig())
    named = settings.resolve({"entropy": {"policy": "deepconf", "params": {"group_id": "g"}}}, installed_policies())
    traces = settings.resolve({"entropy": {"policy": "deepconf"}}, installed_policies(), n=4)
    serving.check_where_groups_meet([named, traces])  # one tokenizer worker: fine
    monkeypatch.setattr(serving, "tokenizer_workers", lambda: 2)
    serving.check_where_groups_meet([traces, None])  # a group of one request: fine anywhere
    with pytest.raises(EntropyRequestError, match="tokenizer-worker-num"):
        serving.check_where_groups_meet([named])


def test_a_budget_groups_requests_are_pinned_to_one_data_parallel_rank():
    from types import SimpleNamespace

    from sglang_entropy.adapter.frontend.groups import GroupBook, scoped_name
    from sglang_entropy.registry import installed_policies
    from sglang_entropy.settings import EntropyRequestError, Limits

    book = GroupBook(Limits())
    options = SimpleNamespace(
        policy="eager", params=installed_policies().get("eager").spec.params(budget_group="pool", budget=3)
    )
    entropy = {"policy": "eager", "params": {"budget_group": "pool", "budget": 3}}

    def rank_of(scope, routed=None):
        obj = SimpleNamespace(sampling_params={"custom_params": {"entropy": entropy}}, routed_dp_rank=routed)

        async def run():
            async with book.budget_group(obj, options, scope, ranks=4):
                return obj.routed_dp_rank

        return asyncio.run(run())

    rank = rank_of("a")
    assert rank == int(scoped_name("a", "pool")[:8], 16) % 4
    assert rank_of("a") == rank_of("a", routed=rank) == rank  # every request of the group: one rank
    with pytest.raises(EntropyRequestError, match="routed_dp_rank"):
        rank_of("a", routed=(rank + 1) % 4)


def test_what_a_speculative_or_diffusion_server_cannot_give_is_refused():
    from types import SimpleNamespace

    from sglang_entropy.adapter.frontend import serving
    from sglang_entropy.registry import installed_policies
    from sglang_entropy.settings import EntropyRequestError, ServerConfig, ServerSettings

    settings = ServerSettings(enabled=True, allowed_policies=None, config=ServerConfig())
    registry = installed_policies()
    signals = settings.resolve({"entropy": {"return_signals": ["entropy"]}}, registry)
    decode = settings.resolve({"entropy": {"policy": "deepconf", "params": {"threshold": 1.0}}}, registry)
    trace = settings.resolve({"entropy": {"dllm_trace": True}}, registry)
    plain = SimpleNamespace(speculative_algorithm=None, dllm_algorithm=None)
    speculative = SimpleNamespace(speculative_algorithm="STANDALONE", dllm_algorithm=None)
    diffusion = SimpleNamespace(speculative_algorithm=None, dllm_algorithm="CCD")
    serving.check_decoding([signals, decode, None], plain)
    serving.check_decoding([trace], diffusion)
    for server_args in (speculative, diffusion):
        with pytest.raises(EntropyRequestError, match=r"custom_params\.entropy\.return_signals"):
            serving.check_decoding([signals], server_args)
        with pytest.raises(EntropyRequestError, match=r"custom_params\.entropy\.policy: 'deepconf'"):
            serving.check_decoding([decode], server_args)
    with pytest.raises(EntropyRequestError, match=r"custom_params\.entropy\.dllm_trace"):
        serving.check_decoding([trace], plain)
    # at launch: naming a decode policy for a server that has no decode steps
    named = ServerSettings(enabled=True, allowed_policies=("deepconf", "taps"), config=ServerConfig())
    named.check_decoding(registry, None, None)
    with pytest.raises(ValueError, match="--speculative-algorithm STANDALONE"):
        named.check_decoding(registry, "STANDALONE", None)
    ServerSettings(enabled=True, allowed_policies=("taps",), config=ServerConfig()).check_decoding(
        registry, "STANDALONE", None
    )
    settings.check_decoding(registry, None, "CCD")  # every installed policy: each request is checked
