"""Server-wide settings (launch flags, environment, config file) and per-request validation."""

from __future__ import annotations

import json
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from sglang_entropy.registry import PolicyRegistry
from sglang_entropy.signals import MAX_TOP_K, SIGNAL_NAMES
from sglang_entropy.types import BranchParams, ConfidenceParams, TopKEntropyParams

ENV_ENABLE = "SGLANG_ENTROPY_ENABLE"
ENV_POLICIES = "SGLANG_ENTROPY_POLICIES"
ENV_CONFIG = "SGLANG_ENTROPY_CONFIG"
ENV_DRAFTERS = "SGLANG_ENTROPY_DRAFTERS"  # comma-separated drafter model paths (--entropy-drafters)
ENV_DLLM = "SGLANG_ENTROPY_DLLM_ALGORITHM"  # SGLang's --dllm-algorithm, set by the launch check
REQUEST_KEY = "entropy"  # sampling_params.custom_params["entropy"]
PREFIX = f"custom_params.{REQUEST_KEY}"  # where errors point
SAMPLING_EPS = 1e-6  # SGLang samples greedily below this temperature (sglang.srt.sampling.sampling_params)
MAX_PROBLEMS = 5  # an error message lists this many validation problems, then a count
MAX_LOCATION = 200  # characters of one problem's location (a key may be long)

SignalName = Literal["entropy", "topk_entropy", "confidence", "margin", "varentropy", "group_confidence"]
assert set(SignalName.__args__) == set(SIGNAL_NAMES)


class SignalSettings(BaseModel):
    """How signals are computed when a request's policy does not say (its parameters
    ``top_k``, ``entropy_top_k`` and ``window_size`` take precedence)."""

    model_config = ConfigDict(extra="forbid")
    confidence_top_k: int = Field(20, ge=1, le=MAX_TOP_K, description="k of DeepConf token confidence")
    entropy_top_k: int = Field(20, ge=2, le=MAX_TOP_K, description="K of the renormalised top-K entropy")
    window_size: int = Field(2048, ge=1, description="tokens in the group-confidence window")
    max_window: int = Field(2048, ge=1, le=65536, description="largest window a request may ask for")


class Limits(BaseModel):
    """What one request, and all clients together, may hold on this server."""

    model_config = ConfigDict(extra="forbid")
    max_sequences: int = Field(
        64,
        ge=1,
        le=4096,
        description="sequences one request may run: n of a group, max_sequences of a branching policy",
    )
    max_groups: int = Field(
        256, ge=1, le=65536, description="named groups (group_id) and budget groups (budget_group) in use at once"
    )


class GroupScope(BaseModel):
    """Group names (``group_id``, ``budget_group``) are private to a client: two clients that use
    the same name get two groups. The client is the value of an HTTP header."""

    model_config = ConfigDict(extra="forbid")
    client_header: str = Field(
        "authorization",
        min_length=1,
        max_length=128,
        description="header whose value names the client (an API key, or the user id a gateway sets)",
    )
    require_client_header: bool = Field(False, description="refuse named groups from requests without the header")


class ServerConfig(BaseModel):
    """The ``--entropy-config`` file (JSON or TOML)."""

    model_config = ConfigDict(extra="forbid")
    signals: SignalSettings = SignalSettings()
    limits: Limits = Limits()
    groups: GroupScope = GroupScope()
    policies: dict[str, dict[str, Any]] = Field(default_factory=dict, description="default parameters per policy")


MAX_COMPOSED = 4  # policies one request may combine


class PolicyChoice(BaseModel):
    """One policy of a composed request: ``{"policy": NAME, "params": {...}}``."""

    model_config = ConfigDict(extra="forbid")
    policy: str = Field(max_length=128)
    params: dict[str, Any] = Field(default_factory=dict, max_length=64)


class EntropyRequest(BaseModel):
    """``sampling_params.custom_params["entropy"]`` of one request: one ``policy`` with its
    ``params``, or several in ``policies`` (composition; a bare list is read as ``policies``)."""

    model_config = ConfigDict(extra="forbid")
    policy: str | None = Field(None, max_length=128)
    params: dict[str, Any] = Field(default_factory=dict, max_length=64)
    policies: list[PolicyChoice] = Field(default_factory=list, max_length=MAX_COMPOSED)
    return_signals: list[SignalName] = Field(default_factory=list, max_length=32)
    dllm_trace: bool = Field(False, description="diffusion LMs: return every denoising step's decisions")


def parse_drafters(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


class EntropyRequestError(ValueError):
    """A request's entropy options are invalid; the message names the field."""


@dataclass(frozen=True)
class ResolvedRequest:
    """A request's validated options. ``policy`` and ``params`` are its primary policy's: the
    one that forms its sequences (a branching policy, else a group policy, else the first);
    ``composed`` lists every policy of the request with its parameters, the primary first."""

    policy: str | None
    params: BaseModel | None
    return_signals: tuple[str, ...]
    confidence_k: int
    entropy_k: int
    window: int
    dllm_trace: bool = False  # diffusion LMs: record every denoising step's decisions
    dllm_params: dict[str, Any] | None = None  # diffusion LMs: the launched algorithm's parameters this request sets
    composed: tuple[tuple[str, BaseModel], ...] = ()  # (policy, params) of each policy, primary first

    @property
    def policies(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.composed)

    @property
    def label(self) -> str | list[str] | None:
        """How responses name the request's policy: its name, or the list of a composition."""
        return list(self.policies) if len(self.composed) > 1 else self.policy


@dataclass(frozen=True)
class ServerSettings:
    enabled: bool
    allowed_policies: tuple[str, ...] | None  # None: every installed policy
    config: ServerConfig
    drafters: tuple[str, ...] = ()  # speculative drafter models (--entropy-drafters)
    dllm_algorithm: str | None = None  # the diffusion LM algorithm the server runs (--dllm-algorithm)

    @classmethod
    def from_env(cls, environ=os.environ) -> "ServerSettings":
        enabled = environ.get(ENV_ENABLE, "").lower() in ("1", "true", "yes", "on")
        allowed = environ.get(ENV_POLICIES) or None
        config_path = environ.get(ENV_CONFIG) or None
        return cls(
            enabled=enabled,
            allowed_policies=tuple(n.strip() for n in allowed.split(",") if n.strip()) if allowed else None,
            config=load_config(config_path, ENV_CONFIG) if config_path else ServerConfig(),
            drafters=parse_drafters(environ.get(ENV_DRAFTERS, "")),
            dllm_algorithm=environ.get(ENV_DLLM) or None,
        )

    def check(self, registry: PolicyRegistry) -> None:
        """Everything a launch can check before the model loads (raises ValueError): the
        enabled policies are installed and the config's default parameters are valid."""
        self.enabled_policies(registry)
        if self.drafters:
            self.default_routing_policy(registry)
        for policy, defaults in self.config.policies.items():
            where = f"--entropy-config: policies.{policy}"
            if policy not in registry:
                raise ValueError(f"{where}: no such policy is installed; installed: {registry.names()}")
            check_fields(registry.get(policy).spec.params, defaults, where, ValueError)

    def check_decoding(self, registry: PolicyRegistry, speculative: str | None, dllm: str | None) -> None:
        """A server that decodes speculatively or runs a diffusion LM has no decode steps for a
        policy to act on (SGLang runs no sampling observer there): enabling a decode policy by
        name in ``--entropy-policies`` is an error (raises ValueError)."""
        if not (speculative or dllm) or self.allowed_policies is None:
            return
        decode = [name for name in self.enabled_policies(registry) if registry.get(name).spec.family == "decode"]
        if decode:
            launched = f"--speculative-algorithm {speculative}" if speculative else f"--dllm-algorithm {dllm}"
            raise ValueError(
                f"--entropy-policies enables {decode}, which act at every decode step; a server launched with "
                f"{launched} runs no decode steps for them"
            )

    def default_routing_policy(self, registry: PolicyRegistry) -> str:
        """The policy that routes the requests of a drafter server that name none: the first
        enabled policy of family "speculative" (in ``--entropy-policies`` order)."""
        enabled = self.enabled_policies(registry)
        routing = [name for name in enabled if registry.get(name).spec.family == "speculative"]
        if not routing:
            raise ValueError(
                f"--entropy-drafters needs an enabled routing policy (family 'speculative'); enabled: {enabled}"
            )
        return routing[0]

    def enabled_policies(self, registry: PolicyRegistry) -> list[str]:
        if self.allowed_policies is None:
            return registry.names()
        missing = [name for name in self.allowed_policies if name not in registry]
        if missing:
            raise ValueError(
                f"--entropy-policies names {missing}, which are not installed; installed: {registry.names()}"
            )
        return list(self.allowed_policies)

    def resolve(
        self,
        raw: Any,
        registry: PolicyRegistry,
        n: int = 1,
        temperature: float | None = None,
        top_k: int | None = None,
    ) -> ResolvedRequest | None:
        """Validate one request's ``custom_params``; ``None`` when it asks for nothing.

        ``n`` (the request's number of samples), its sampling ``temperature`` and ``top_k``
        (None where unknown), whether SGLang will decode it greedily, and the server's
        ``num_drafters`` reach the policy's validators as ``info.context``: a group policy may
        accept some parameters only for groups, a branching policy may require sampling, a
        routing policy may check a drafter index."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise EntropyRequestError("custom_params must be an object")
        if REQUEST_KEY not in raw:
            return None
        entry = raw[REQUEST_KEY]
        try:
            request = EntropyRequest.model_validate({"policies": entry} if isinstance(entry, list) else entry)
        except ValidationError as e:
            raise EntropyRequestError(describe_errors(e, PREFIX)) from None
        greedy = (temperature is not None and temperature < SAMPLING_EPS) or top_k == 1
        context = {"n": n, "temperature": temperature, "greedy": greedy, "num_drafters": len(self.drafters)}
        composed, dllm_params = [], None
        if request.policies:
            if request.policy is not None or request.params:
                raise EntropyRequestError(
                    f"{PREFIX}.policies: give either one policy (policy, params) or several (policies), not both"
                )
            for i, choice in enumerate(request.policies):
                where = f"{PREFIX}.policies[{i}]"
                composed.append((choice.policy, self._params(choice.policy, choice.params, context, registry, where)))
            composed = self._compose(composed, registry, n)
        elif request.policy is not None:
            composed = [(request.policy, self._params(request.policy, request.params, context, registry, PREFIX))]
            self._check_sequences(registry.get(request.policy).spec, composed[0][1], n, PREFIX)
        elif request.params:
            dllm_params = self._dllm_params(request.params, registry)
        return self._with_signal_settings(request, composed, dllm_params)

    def _params(self, policy: str, values: dict, context: dict, registry: PolicyRegistry, where: str) -> BaseModel:
        """One policy's parameters: the config file's defaults with the request's, validated."""
        spec = self._selectable(policy, registry, f"{where}.policy")
        try:
            return spec.params.model_validate({**self.config.policies.get(policy, {}), **values}, context=context)
        except ValidationError as e:
            raise EntropyRequestError(describe_errors(e, f"{where}.params")) from None

    def _compose(self, composed: list, registry: PolicyRegistry, n: int) -> list:
        """The rules of a composed request (400 naming why); the primary policy first."""
        names = [name for name, _ in composed]
        specs = [registry.get(name).spec for name in names]
        where = f"{PREFIX}.policies"
        if len(set(names)) < len(names):
            raise EntropyRequestError(f"{where}: {names} names a policy twice")
        for spec in specs:
            if spec.family != "decode":
                raise EntropyRequestError(
                    f"{where}: {spec.name!r} is of family {spec.family!r}; only decode-step policies combine "
                    "(a diffusion or speculative policy decides alone)"
                )
        for kind, what in (("branches", "fork sequences by two rules"), ("groups", "each run their own group")):
            owners = [spec.name for spec in specs if getattr(spec, kind)]
            if len(owners) > 1:
                raise EntropyRequestError(f"{where}: {owners} would {what}; a request may hold one of them")
        for i, spec in enumerate(specs):
            self._check_sequences(spec, composed[i][1], n, f"{where}[{i}]")
        primary = next((i for kind in ("branches", "groups") for i, spec in enumerate(specs) if getattr(spec, kind)), 0)
        return [composed[primary], *composed[:primary], *composed[primary + 1 :]]

    def _dllm_params(self, values: dict, registry: PolicyRegistry) -> dict:
        """On a diffusion LM server, ``params`` without a policy set the launched algorithm's
        parameters for this request: each is checked here against the policy's model; the
        scheduler checks them together with the launch's (``--dllm-algorithm-config``)."""
        policy = registry.dllm_policies().get(self.dllm_algorithm) if self.dllm_algorithm else None
        if policy is None:
            raise EntropyRequestError(f"{PREFIX}.params: parameters given without a policy")
        check_fields(registry.get(policy).spec.params, values, f"{PREFIX}.params", EntropyRequestError)
        return dict(values)

    def _selectable(self, policy: str, registry: PolicyRegistry, where: str = f"{PREFIX}.policy"):
        """The spec of a policy a request may select by name on this server."""
        enabled = self.enabled_policies(registry)
        if policy not in registry:
            raise EntropyRequestError(f"{where}: unknown policy {policy!r}; installed: {registry.names()}")
        if policy not in enabled:
            raise EntropyRequestError(
                f"{where}: policy {policy!r} is not enabled on this server (--entropy-policies); enabled: {enabled}"
            )
        spec = registry.get(policy).spec
        if spec.family == "dllm":
            raise EntropyRequestError(
                f"{where}: {policy!r} is a diffusion unmasking policy; the server runs it for "
                f"every request when launched with --dllm-algorithm {spec.dllm_algorithm}"
            )
        if spec.family == "speculative" and len(self.drafters) < 2:
            raise EntropyRequestError(
                f"{where}: {policy!r} routes speculative drafts; it needs a server launched "
                "with --entropy-drafters PATH,PATH (two or more drafter models)"
            )
        return spec

    def _with_signal_settings(self, request: EntropyRequest, composed: list, dllm_params=None) -> ResolvedRequest:
        """The request with the signal settings its policies set (or the server's), in range.
        A slot computes one set of signals, so the policies of a composition must agree on them."""
        signals = self.config.signals
        settings = {"top_k": signals.confidence_top_k, "window_size": signals.window_size}
        settings["entropy_top_k"] = signals.entropy_top_k
        set_by: dict[str, str] = {}  # field -> the policy whose parameters set it explicitly
        kinds = (ConfidenceParams, ("top_k", "window_size")), (TopKEntropyParams, ("entropy_top_k",))
        # the policies' own signal settings win over the server's: a value the request (or the
        # config file) set over a policy's default; two set values must agree
        for explicit in (True, False):
            for name, params in composed:
                for field in (f for kind, fields in kinds if isinstance(params, kind) for f in fields):
                    value = getattr(params, field)
                    if (field in params.model_fields_set) != explicit or (not explicit and field in set_by):
                        continue
                    if field in set_by and settings[field] != value:
                        raise EntropyRequestError(
                            f"{PREFIX}.policies: {set_by[field]} and {name} set params.{field} to {settings[field]} "
                            f"and {value}; a request computes its signals one way, so they must agree"
                        )
                    settings[field], set_by[field] = value, name
        for field, low, high in (
            ("top_k", 1, MAX_TOP_K),
            ("entropy_top_k", 2, MAX_TOP_K),
            ("window_size", 1, signals.max_window),
        ):
            if not low <= settings[field] <= high:
                raise EntropyRequestError(
                    f"{PREFIX}.params.{field}: {settings[field]} is outside [{low}, {high}] on this server"
                )
        policy, params = composed[0] if composed else (None, None)
        return ResolvedRequest(
            policy=policy,
            params=params,
            return_signals=tuple(dict.fromkeys(request.return_signals)),
            confidence_k=settings["top_k"],
            entropy_k=settings["entropy_top_k"],
            window=settings["window_size"],
            dllm_trace=request.dllm_trace,
            dllm_params=dllm_params,
            composed=tuple(composed),
        )

    def _check_sequences(self, spec, params, n: int, prefix: str) -> None:
        """Sequences per request: a group's ``n``, a branching policy's ``max_sequences``."""
        limit = self.config.limits.max_sequences
        if spec.branches and n > 1:
            raise EntropyRequestError(
                f"sampling_params.n: {spec.name} starts one sequence per request and forks it "
                f"(n = {n}); set {prefix}.params.max_sequences instead"
            )
        if spec.groups and n > limit:
            raise EntropyRequestError(
                f"sampling_params.n: {n} traces exceed this server's limit of {limit} per request "
                "([limits] max_sequences)"
            )
        wanted = params.max_sequences if isinstance(params, BranchParams) else 1
        if wanted > limit:
            raise EntropyRequestError(
                f"{prefix}.params.max_sequences: {wanted} exceeds this server's limit of {limit} "
                "per request ([limits] max_sequences)"
            )


def set_primary_params(entry: Any, policy: str, updates: dict[str, Any]) -> dict:
    """A copy of a request's raw ``custom_params.entropy`` (already validated) with ``updates``
    in the parameters of its policy ``policy`` (the primary one), in either form."""
    entry = {"policies": entry} if isinstance(entry, list) else dict(entry)
    if not entry.get("policies"):
        entry["params"] = {**entry.get("params", {}), **updates}
        return entry
    entry["policies"] = [
        {**c, "params": {**c.get("params", {}), **updates}} if c["policy"] == policy else c for c in entry["policies"]
    ]
    return entry


def check_fields(model: type[BaseModel], values: dict, where: str, error: type[ValueError]) -> None:
    """Each of ``values`` alone against its field of ``model`` (raises ``error`` naming the
    field): rules across fields are checked where all the values meet."""
    fields = model.model_fields
    for name, value in values.items():
        if name not in fields:
            raise error(f"{where}.{name}: not a parameter of this policy; parameters: {sorted(fields)}")
        annotation = fields[name].annotation
        finite = (AllowInfNan(False),) if float in (annotation, *typing.get_args(annotation)) else ()
        metadata = (*finite, *fields[name].metadata)
        field_type = Annotated[(annotation, *metadata)] if metadata else annotation
        try:
            TypeAdapter(field_type).validate_python(value)
        except ValidationError as e:
            raise error(describe_errors(e, f"{where}.{name}")) from None


def load_config(path: str | Path, source: str = "--entropy-config") -> ServerConfig:
    """The config file at ``path``; a problem raises ValueError with one line: the source that
    named the file (the flag or ``SGLANG_ENTROPY_CONFIG``), the file, the key, what is wrong."""
    path = Path(path)
    where = f"{source} {path}" if source.startswith("--") else f"{source}={path}"
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{where}: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{where}: {describe_errors(e, '')}") from None


def describe_errors(error: ValidationError, prefix: str) -> str:
    """The first MAX_PROBLEMS problems, each naming its field, then how many more there were."""
    parts = []
    problems = error.errors(include_url=False, include_input=False)
    for item in problems[:MAX_PROBLEMS]:
        location = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        if len(location) > MAX_LOCATION:
            location = location[:MAX_LOCATION] + "..."
        parts.append(f"{location}: {item['msg']}")
    if len(problems) > MAX_PROBLEMS:
        parts.append(f"and {len(problems) - MAX_PROBLEMS} more problems")
    return "; ".join(parts)
