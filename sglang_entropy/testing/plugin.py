"""The pytest plugin (entry point ``pytest11``): markers and the launched-server fixtures."""

import json
import signal
import sys

import pytest

MARKERS = (
    "slow: long benchmarks, run on demand with -m slow",
    "server: starts the real SGLang server",
    "gpu: device code on a CUDA GPU (skipped without one); run by .ci/gpu",
)


def pytest_configure(config):
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    # A SIGTERM (CI time-out, `timeout`) must still run the fixtures' teardown, which stops
    # the servers; they run in their own process groups and would otherwise outlive pytest.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@pytest.fixture(scope="session")
def model_path():
    """The embedded default model (SmolLM2-135M-Instruct), built on first use."""
    from sglang_entropy.tools.model import build_default_model

    return build_default_model()


@pytest.fixture(scope="session")
def entropy_server(model_path, tmp_path_factory):
    """The real SGLang server with the adapter, the deepconf, echo and eager policies enabled, and a
    config file that sets deepconf's default window to 8 tokens and at most 32 sequences per request,
    and SGLang's metrics on."""
    from sglang_entropy.tools import server as sglang_server

    config = tmp_path_factory.mktemp("config") / "entropy.json"
    config.write_text(json.dumps({"policies": {"deepconf": {"window_size": 8}}, "limits": {"max_sequences": 32}}))
    args = ["--entropy-policies", "deepconf,echo,eager", "--entropy-config", str(config), "--enable-metrics"]
    with sglang_server.launch(model_path, enable_entropy=True, extra_args=args) as server:
        yield server


@pytest.fixture(scope="session")
def plain_server(model_path):
    """The same server with the package installed but the adapter not enabled."""
    from sglang_entropy.tools import server as sglang_server

    with sglang_server.launch(model_path, enable_entropy=False) as server:
        yield server


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
