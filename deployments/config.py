"""Serving settings: one pydantic model tree for engine + Ray Serve.

``serve_config.yaml``'s ``applications[].args`` is the user-facing form of :class:`AppConfig`;
``deployments.app:build_app`` validates it with :func:`load_app_config` and fails with a message
that names the bad field and the fix. ``engine:`` is :class:`engine.config.EngineConfig` itself
(embedded, not copied), so a setting exists in exactly one place.
"""
from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.config import EngineConfig


class RouterSettings(BaseModel):
    """Warm-bucket request router of the model deployment (see deployments/router.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: Ray Serve's default power-of-two-choices router")
    stats_period_s: float = Field(
        1.0, gt=0, description="how often each replica's record_routing_stats is polled")
    stats_timeout_s: float = Field(10.0, gt=0, description="record_routing_stats call timeout")
    imbalance_threshold: int = Field(
        2, ge=0,
        description="spill to a cold replica when the best warm one has more than this many "
                    "requests above the least-loaded cold replica (it then serves by JIT and warms)")
    hint_ttl_s: float = Field(
        10.0, ge=0,
        description="a bucket just sent to a cold replica counts as 'capturing' there for this "
                    "long, covering the lag until the replica's stats report it")


class IngressSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0, description="CPU reservation of each ingress replica")
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(
        -1, ge=-1, description="requests queued at the HTTP proxy for the ingress before it answers "
                               "503 with Retry-After (-1: no limit; the model queue below is the real bound)")


LATENCY_POLICY = "autoscale.ray_policy:LatencyAutoscalingPolicy"


class AutoscalingPolicySettings(BaseModel):
    """The autoscaling policy: by default the project's P99-latency policy (docs/autoscaling.md)."""

    model_config = ConfigDict(extra="forbid")

    policy_function: str = Field(LATENCY_POLICY, description="import path of Ray Serve's custom policy")
    policy_kwargs: dict[str, Any] = Field(default_factory=dict, description="the policy's settings "
                                          "(autoscale.policy.LatencyPolicyConfig for the latency policy)")

    @model_validator(mode="after")
    def _check_kwargs(self) -> "AutoscalingPolicySettings":
        if self.policy_function == LATENCY_POLICY:   # a bad latency-policy setting fails here, at deploy time
            from autoscale.policy import LatencyPolicyConfig
            try:
                LatencyPolicyConfig(**self.policy_kwargs)
            except ValidationError as e:
                bad = "; ".join(f"policy_kwargs.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                raise ValueError(f"{bad} (the latency policy needs at least p99_ttft_ms, its P99 TTFT "
                                 "objective in ms; policy: null selects Ray's queue-length policy)") from None
        return self


class AutoscalingSettings(BaseModel):
    """Ray Serve's autoscaling_config of the model deployment, typed (``policy`` included)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float | None = Field(None, gt=0)
    metrics_interval_s: float | None = Field(None, gt=0)
    look_back_period_s: float | None = Field(None, gt=0)
    upscale_delay_s: float | None = Field(None, ge=0)
    downscale_delay_s: float | None = Field(None, ge=0)
    downscale_to_zero_delay_s: float | None = Field(None, ge=0)
    upscaling_factor: float | None = Field(None, gt=0)
    downscaling_factor: float | None = Field(None, gt=0)
    policy: AutoscalingPolicySettings | None = Field(
        None, description="the custom policy ({} or policy_kwargs alone: the P99-latency policy); "
                          "null: Ray's queue-length policy")

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) is above max_replicas "
                             f"({self.max_replicas})")
        return self

    def to_ray(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class AppConfig(BaseModel):
    """Everything the hybridserve Ray Serve application needs (engine + serving)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("hybridserve", description="Serve application name (serve.get_app_handle(name))")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    engine_factory: str | None = Field(
        None, description="import path 'module:callable' building the replica's engine from an EngineConfig "
                          "(plus engine_factory_args); default: engine.HybridEngine")
    engine_factory_args: dict[str, Any] = Field(default_factory=dict)
    served_model_name: str | None = Field(
        None, description="model id in the OpenAI API; default: the engine's model name")

    # model deployment
    num_replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="autoscaling of the model deployment (replaces num_replicas); both shipped configs "
                          "set the P99-latency policy")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica: 1 on GPU machines, 0 on CPU")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica")
    replica_queue: int = Field(
        7, ge=0, description="requests a model replica accepts beyond the engine's batch (they wait in its engine)")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="per model replica; default: the engine's max batch + replica_queue")
    max_queued_requests: int = Field(
        32, ge=-1,
        description="back-pressure: requests waiting for a free model slot (all replicas at "
                    "max_ongoing_requests) beyond which the app answers 503 with Retry-After at once; "
                    "-1: unbounded queue (latency grows for everyone)")
    retry_after_s: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Retry-After (seconds, rounded up) on 503 answers")
    graceful_shutdown_timeout_s: float = Field(
        60.0, ge=0, description="scale-down/redeploy: a model replica waits up to this long for its "
                                "in-flight requests to finish before it is stopped")
    engine_stuck_s: float = Field(
        30.0, gt=0, description="the replica's health check fails when its engine has made no step for "
                                "this long with work in flight (Ray Serve then replaces the replica)")
    health_check_period_s: float = Field(10.0, gt=0, description="how often Ray Serve checks each model "
                                         "replica's health (3 failures in a row replace it)")
    max_request_bytes: int = Field(
        4 * 2**20, ge=1024, description="request bodies larger than this get 413 (counted as they are read)")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="an answer not complete by then gets 504 (a request's own request_timeout_s "
                                 "may set a shorter one); null: no limit")
    topology: Literal["split", "colocated", "local_first"] = Field(
        "split", description="split: Ray proxy -> Ingress replicas -> ModelServer replicas (the warm-bucket "
                             "router sees each prompt's bucket); colocated: the OpenAI API inside each model "
                             "replica (one hop fewer; HTTP requests are balanced by load only); local_first: "
                             "colocated behind Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1), a "
                             "replica serves the prompts it is warm for and forwards a miss to the replica the "
                             "warm-bucket policy picks (deployments/colocated.py)")
    forward_timeout_s: float = Field(
        30.0, gt=0, description="local_first: a peer that sends no byte of its answer for this long is given "
                                "up and the request is served here")
    user_code_thread: bool = Field(
        True, description="Ray Serve runs each replica's request handlers on a separate event-loop thread "
                          "(Ray's default); false: on the replica's own loop (one thread hop fewer per ASGI "
                          "message). Set per deployment through runtime_env")
    handle_transport: Literal["ray", "grpc"] = Field(
        "grpc", description="split topology: how the Ingress calls the model replicas: Ray Serve's gRPC "
                            "transport between replicas, or Ray actor calls (docs/latency.md)")
    access_log: bool = Field(True, description="Ray Serve's per-request access log lines in the replicas")
    router: RouterSettings = Field(default_factory=RouterSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)

    # HTTP (the mount point is the application's own route_prefix in serve_config.yaml)
    api_key_env: str | None = Field(
        "HYBRIDSERVE_API_KEY",
        description="env var holding the API key; when that variable is set and non-empty, "
                    "requests need 'Authorization: Bearer <key>'. null disables the check")
    http_docs: bool = Field(False, description="serve /docs and /openapi.json")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request omits it")

    latency_window_s: float = Field(30.0, gt=0, description="sliding window of the P99 latency each "
                                    "replica reports to the autoscaling policy")

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        if self.num_gpus > 0 and self.engine.device == "cpu":
            raise ValueError("num_gpus > 0 but engine.device is 'cpu': set engine.device to 'cuda' "
                             "(or 'auto'), or num_gpus to 0")
        if self.num_gpus == 0 and self.engine.device == "cuda":
            raise ValueError("engine.device is 'cuda' but num_gpus is 0: Ray would hide the GPU from "
                             "the replica; set num_gpus: 1")
        for name, v in (("max_queued_requests", self.max_queued_requests),
                        ("ingress.max_queued_requests", self.ingress.max_queued_requests)):
            if v == 0:
                raise ValueError(f"{name} must be -1 (no limit) or a positive integer, got 0")
        if self.topology == "local_first" and not self.router.enabled:
            raise ValueError("topology local_first applies the warm-bucket policy on a miss: set "
                             "router.enabled: true (or topology: colocated)")
        return self

    @property
    def colocated(self) -> bool:
        """The API served inside the model replicas (colocated or local_first)."""
        return self.topology != "split"

    @property
    def replica_max_ongoing(self) -> int:
        """max_ongoing_requests of a model replica: set, or the engine's KV slots + replica_queue."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return self.engine.slots(self.num_gpus > 0) + self.replica_queue

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return os.path.basename(os.path.normpath(self.engine.model)) or self.engine.model

    def replica_runtime(self) -> dict[str, Any]:
        """Deployment options every hybridserve deployment shares: event-loop threading and access log."""
        out: dict[str, Any] = {"logging_config": {"enable_access_log": self.access_log}}
        if not self.user_code_thread:
            out["runtime_env"] = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}
        return out

    def resolved_device(self) -> str:
        """The device the replicas will use ('auto' resolves by num_gpus)."""
        if self.engine.device != "auto":
            return self.engine.device
        return "cuda" if self.num_gpus > 0 else "cpu"


class ConfigError(ValueError):
    """serve_config.yaml's args do not validate; the message lists each bad field and the fix."""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown setting; remove it or fix its spelling")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required setting is missing")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_app_config(args: dict[str, Any] | AppConfig | None) -> AppConfig:
    """Validate serve_config.yaml ``args`` (a dict) into an AppConfig; ConfigError if bad."""
    if isinstance(args, AppConfig):
        return args
    args = dict(args or {})
    try:
        return AppConfig.model_validate(args)
    except ValidationError as e:
        raise ConfigError(
            "invalid hybridserve application args (serve_config.yaml applications[].args):\n"
            + _format_errors(e)
            + "\nSee deployments/config.py (AppConfig) for every setting and its default."
        ) from None
