import json
from types import SimpleNamespace

import pytest

from sglang_entropy import hookimpl
from sglang_entropy.registry import PolicyRegistry, installed_policies, make_plugin_manager
from sglang_entropy.settings import EntropyRequestError, ServerConfig, ServerSettings, load_config
from sglang_entropy.types import PolicyParams, PolicySpec


def settings(**env):
    return ServerSettings.from_env({"SGLANG_ENTROPY_ENABLE": "1", **env})


def resolve(raw, **env):
    return settings(**env).resolve(raw, installed_policies())


def test_no_entropy_options_means_nothing_to_do():
    assert resolve(None) is None
    assert resolve({"other": 1}) is None


def test_valid_request_resolves_policy_params_and_signal_settings():
    resolved = resolve(
        {
            "entropy": {
                "policy": "deepconf",
                "params": {"threshold": 3, "window_size": 16, "top_k": 5},
                "return_signals": ["confidence", "confidence", "entropy"],
            }
        }
    )
    assert resolved.policy == "deepconf"
    assert resolved.params.threshold == 3.0
    assert (resolved.window, resolved.confidence_k, resolved.entropy_k) == (16, 5, 20)
    assert resolved.return_signals == ("confidence", "entropy")


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"entropy": {"policy": "no-such-policy"}}, "custom_params.entropy.policy"),
        (
            {"entropy": {"policy": "deepconf", "params": {"threshold": "high"}}},
            "custom_params.entropy.params.threshold",
        ),
        ({"entropy": {"policy": "deepconf", "params": {}}}, "custom_params.entropy.params.threshold"),
        (
            {"entropy": {"policy": "deepconf", "params": {"threshold": 1, "bogus": 2}}},
            "custom_params.entropy.params.bogus",
        ),
        (
            {"entropy": {"policy": "deepconf", "params": {"threshold": 1, "window_size": 4096}}},
            "custom_params.entropy.params.window_size",
        ),
        ({"entropy": {"return_signals": ["perplexity"]}}, "custom_params.entropy.return_signals.0"),
        ({"entropy": {"params": {"threshold": 1}}}, "custom_params.entropy.params"),
        ({"entropy": {"policy": "deepconf", "code": "import os"}}, "custom_params.entropy.code"),
        ({"entropy": "deepconf"}, "custom_params.entropy"),
    ],
)
def test_invalid_requests_name_the_field(raw, field):
    with pytest.raises(EntropyRequestError) as error:
        resolve(raw)
    assert str(error.value).startswith(field)


def test_policy_not_enabled_at_launch_is_refused():
    class OtherPolicy:
        @hookimpl
        def register_policies(self, register):
            register(PolicySpec(name="other", params=PolicyParams), SimpleNamespace(decode_step=print))

    manager = make_plugin_manager()
    manager.register(OtherPolicy())
    registry = PolicyRegistry(manager)
    with pytest.raises(EntropyRequestError, match="not enabled on this server") as error:
        settings(SGLANG_ENTROPY_POLICIES="other").resolve(
            {"entropy": {"policy": "deepconf", "params": {"threshold": 1}}}, registry
        )
    assert str(error.value).startswith("custom_params.entropy.policy")


def test_config_file_sets_server_defaults(tmp_path):
    path = tmp_path / "entropy.toml"
    path.write_text("[signals]\nconfidence_top_k = 10\n\n[policies.deepconf]\nthreshold = 2.5\nwindow_size = 32\n")
    resolved = resolve({"entropy": {"policy": "deepconf"}}, SGLANG_ENTROPY_CONFIG=str(path))
    assert (resolved.params.threshold, resolved.window) == (2.5, 32)
    # the policy's own top_k default (20) wins over the server's signal default
    assert resolved.confidence_k == 20
    assert resolve({"entropy": {"return_signals": ["confidence"]}}, SGLANG_ENTROPY_CONFIG=str(path)).confidence_k == 10


def test_bad_config_file_is_a_clear_error(tmp_path):
    path = tmp_path / "entropy.json"
    path.write_text(json.dumps({"signals": {"confidence_top_k": 0}}))
    with pytest.raises(ValueError, match="confidence_top_k"):
        load_config(path)
    with pytest.raises(ValueError, match="No such file"):
        load_config(tmp_path / "missing.json")


def test_a_bad_config_names_its_source_file_and_key_in_one_line(tmp_path):
    path = tmp_path / "entropy.toml"
    path.write_text("[signals]\nwindow_sise = 4\n")
    reason = "signals.window_sise: Extra inputs are not permitted"
    with pytest.raises(ValueError) as flag:
        load_config(path)
    assert str(flag.value) == f"--entropy-config {path}: {reason}"
    with pytest.raises(ValueError) as environment:
        ServerSettings.from_env({"SGLANG_ENTROPY_ENABLE": "1", "SGLANG_ENTROPY_CONFIG": str(path)})
    assert str(environment.value) == f"SGLANG_ENTROPY_CONFIG={path}: {reason}"
    path.write_text("[signals\n")
    with pytest.raises(ValueError, match=r"^--entropy-config .*: not valid TOML: .*$"):
        load_config(path)


def test_unknown_policy_at_launch_is_a_clear_error():
    with pytest.raises(ValueError, match="not installed"):
        settings(SGLANG_ENTROPY_POLICIES="deepconf,missing").enabled_policies(installed_policies())


def test_config_defaults_of_every_field_type_are_checked_field_by_field():
    """Literal, bool and optional fields too (a finiteness check applies to floats only)."""
    config = ServerConfig.model_validate({"policies": {"taps": {"granularity": "request", "drafter": 1}}})
    ServerSettings(enabled=True, allowed_policies=None, config=config).check(installed_policies())
    bad = ServerConfig.model_validate({"policies": {"taps": {"granularity": "sometimes"}}})
    with pytest.raises(ValueError, match="policies.taps.granularity"):
        ServerSettings(enabled=True, allowed_policies=None, config=bad).check(installed_policies())


def test_a_diffusion_server_takes_the_launched_algorithms_parameters_per_request():
    raw = {"entropy": {"params": {"budget": 2, "early_exit": "none"}}}
    dllm = ServerSettings(enabled=True, allowed_policies=None, config=ServerConfig(), dllm_algorithm="CCD")
    assert dllm.resolve(raw, installed_policies()).dllm_params == {"budget": 2, "early_exit": "none"}
    with pytest.raises(EntropyRequestError, match=r"custom_params\.entropy\.params\.budget"):
        dllm.resolve({"entropy": {"params": {"budget": 0}}}, installed_policies())
    plain = ServerSettings(enabled=True, allowed_policies=None, config=ServerConfig())
    with pytest.raises(EntropyRequestError, match="parameters given without a policy"):
        plain.resolve(raw, installed_policies())
