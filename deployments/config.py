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


class AppConfig(BaseModel):
    """Everything the hybridserve Ray Serve application needs (engine + serving)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("hybridserve", description="Serve application name (serve.get_app_handle(name))")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    served_model_name: str | None = Field(
        None, description="model id in the OpenAI API; default: the engine's model name")

    # model deployment
    num_replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config for the model deployment "
                          "(min_replicas, max_replicas, policy, ...); replaces num_replicas")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica: 1 on GPU machines, 0 on CPU")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica")
    max_ongoing_requests: int = Field(
        8, ge=1, description="per model replica; the engine runs one request at a time, the rest queue")
    max_queued_requests: int = Field(
        32, ge=-1,
        description="back-pressure: requests waiting at each ingress replica for a free model slot "
                    "(all replicas at max_ongoing_requests) beyond which the ingress answers 503 "
                    "with Retry-After at once; -1: unbounded queue (latency grows for everyone)")
    retry_after_s: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Retry-After (seconds, rounded up) on 503 answers")
    graceful_shutdown_timeout_s: float = Field(
        60.0, ge=0, description="scale-down/redeploy: a model replica waits up to this long for its "
                                "in-flight requests to finish before it is stopped")
    max_request_bytes: int = Field(
        4 * 2**20, ge=1024, description="request bodies larger than this get 413 before parsing")
    topology: Literal["split", "colocated"] = Field(
        "split", description="split: Ray proxy -> Ingress replicas -> ModelServer replicas (the warm-bucket "
                             "router sees each prompt's token count); colocated: the OpenAI API is served "
                             "inside each model replica (one hop fewer, lowest latency; the router has no "
                             "token count for HTTP requests and balances by load). With "
                             "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 each colocated replica also listens on its "
                             "own HTTP port (no proxy hop): see docs/latency.md")
    ingress_router: bool = Field(
        False, description="colocated topology only: route each HTTP request by its prompt's bucket before "
                           "it reaches a replica, through Ray Serve's HAProxy ingress (needs "
                           "RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1 in "
                           "the Ray cluster's environment; deployments/bucket_route.py)")
    local_first: bool = Field(
        False, description="colocated topology only: a replica serves a prompt itself when it holds a warm "
                           "graph for the prompt's bucket; on a miss it applies the warm-bucket policy to the "
                           "replicas' routing stats and, when that picks another replica, forwards the HTTP "
                           "request to that replica's own port (at most one hop). In front: Ray Serve's HAProxy "
                           "ingress (RAY_SERVE_ENABLE_HA_PROXY=1 in the Ray cluster's environment), balancing by "
                           "load, with no per-request routing call (deployments/colocated.py)")
    user_code_thread: bool = Field(
        True, description="Ray Serve runs each replica's request handlers on a separate event-loop thread "
                          "(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, Ray's default). false: on the replica's "
                          "own loop, which saves a thread hop per ASGI message (CPU A/B about -0.4 ms HTTP "
                          "overhead; within noise on an H100). Set per deployment through runtime_env")
    handle_transport: Literal["ray", "grpc"] = Field(
        "grpc", description="split topology: how the Ingress calls the model replicas. grpc: Ray Serve's "
                            "direct gRPC transport between replicas (handle option _by_reference=False; CPU "
                            "A/B: HTTP overhead -3 to -5 ms); ray: Ray actor calls (results through the object "
                            "store)")
    access_log: bool = Field(True, description="Ray Serve's per-request access log lines in the replicas")
    router: RouterSettings = Field(default_factory=RouterSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)

    # HTTP (the mount point is the application's own route_prefix in serve_config.yaml)
    api_key_env: str | None = Field(
        "HYBRIDSERVE_API_KEY",
        description="env var holding the API key; when that variable is set and non-empty, "
                    "requests need 'Authorization: Bearer <key>'. null disables the check")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request omits it")

    latency_window_s: float = Field(30.0, gt=0, description="sliding window of the P99 latency each "
                                    "replica reports to the autoscaling policy")

    # test-only
    inject_latency_ms: float = Field(
        0.0, ge=0, description="TEST ONLY: sleep this long in the model replica before each request")
    inject_latency_file: str | None = Field(
        None, description="TEST ONLY: path of a file holding a number of milliseconds; when set, each "
                          "model replica re-reads it (at most every 0.5 s; missing file: 0) and uses it "
                          "in place of inject_latency_ms, so a test can change the latency at run time")

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
        if self.ingress_router and self.topology != "colocated":
            raise ValueError("ingress_router needs topology: colocated (the split topology's Ingress "
                             "already routes by bucket); set topology: colocated or drop ingress_router")
        if self.local_first and self.topology != "colocated":
            raise ValueError("local_first needs topology: colocated (in the split topology the Ingress routes "
                             "every prompt by bucket already); set topology: colocated or drop local_first")
        if self.local_first and self.ingress_router:
            raise ValueError("local_first and ingress_router are two ways to route colocated replicas: "
                             "ingress_router asks the router on every request, local_first only on a miss; "
                             "set one of them")
        if self.local_first and not self.router.enabled:
            raise ValueError("local_first applies the warm-bucket policy on a miss: set router.enabled: true")
        if self.ingress_router and not self.router.enabled:
            raise ValueError("ingress_router routes through the warm-bucket router: set router.enabled: true")
        if self.autoscaling is not None:
            for key in ("min_replicas", "max_replicas"):
                v = self.autoscaling.get(key)
                if v is not None and (not isinstance(v, int) or v < 0):
                    raise ValueError(f"autoscaling.{key} must be an integer >= 0, got {v!r}")
        return self

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
