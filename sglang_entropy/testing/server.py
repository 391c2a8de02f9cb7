"""What the tests read of a launched server's state: the adapter's, SGLang's KV usage, and the
adapter's metrics on ``/metrics``."""

import threading
import time

import requests
from prometheus_client.parser import text_string_to_metric_families


def _url(server) -> str:
    return server if isinstance(server, str) else server.url


def generate(server, text, entropy: dict | None = None, rid: str | None = None, timeout: float = 600, **sampling):
    """``POST /generate`` with ``text`` (a prompt or a list of them), the sampling parameters,
    ``custom_params.entropy`` and ``rid`` when given; the JSON answer. Raises on any status but
    200, with the server's reason. ``server`` is a launched ``Server`` or a URL."""
    if entropy is not None:
        sampling["custom_params"] = {"entropy": entropy}
    body = {"text": text, "sampling_params": sampling, **({"rid": rid} if rid is not None else {})}
    response = requests.post(f"{_url(server)}/generate", json=body, timeout=timeout)
    if response.status_code != 200:
        raise AssertionError(f"/generate answered {response.status_code}: {response.text[:1000]}")
    return response.json()


def entropy_state(server):
    """The adapter's live state (``/get_server_info``, first scheduler)."""
    info = requests.get(f"{server.url}/get_server_info", timeout=60).json()
    return info["internal_states"][0]["entropy"]


def used_tokens(server):
    """KV tokens in use once the radix cache is flushed (``/v1/loads``)."""
    requests.post(f"{server.url}/flush_cache", timeout=60).raise_for_status()
    loads = requests.get(f"{server.url}/v1/loads", timeout=60).json()["loads"]
    return sum(load["num_used_tokens"] for load in loads)


def scrape(url: str) -> dict:
    """(sample name, labels without model_name) -> value, for the adapter's metrics."""
    text = requests.get(f"{url}/metrics", timeout=60).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("sglang:entropy_"):
                labels = frozenset((k, v) for k, v in sample.labels.items() if k != "model_name")
                values[(sample.name, labels)] = sample.value
    return values


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def abort_once_branched(server, rid: str, generate, sequences: int = 3, timeout: float = 120):
    """Run ``generate()`` (a branching request with ``rid``) in a thread, abort ``rid`` once the
    server runs ``sequences`` of its sequences, and return what ``generate`` returned."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(value=generate()))
    worker.start()
    deadline = time.time() + timeout
    while entropy_state(server)["active_requests"] < sequences:
        assert time.time() < deadline, "the request never branched"
        time.sleep(0.2)
    requests.post(f"{server.url}/abort_request", json={"rid": rid}, timeout=60).raise_for_status()
    worker.join(timeout=300)
    assert not worker.is_alive()
    return result["value"]
