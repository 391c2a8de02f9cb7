"""What the tests read of a launched server's state: the adapter's and SGLang's KV usage."""

import requests


def entropy_state(server):
    """The adapter's live state (``/get_server_info``, first scheduler)."""
    info = requests.get(f"{server.url}/get_server_info", timeout=60).json()
    return info["internal_states"][0]["entropy"]


def used_tokens(server):
    """KV tokens in use once the radix cache is flushed (``/v1/loads``)."""
    requests.post(f"{server.url}/flush_cache", timeout=60).raise_for_status()
    loads = requests.get(f"{server.url}/v1/loads", timeout=60).json()["loads"]
    return sum(load["num_used_tokens"] for load in loads)
