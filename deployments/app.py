"""Application builder: ``import_path: deployments.app:build_app`` in serve_config.yaml.

``build_app(args)`` validates ``args`` as :class:`deployments.config.AppConfig` and wires, by
``topology``: split (Ingress -> ModelServer replicas behind the warm-bucket router), or colocated /
local_first (one deployment whose replicas serve the API next to their engine).
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from .config import AppConfig, load_app_config
from .ingress import Ingress
from .server import ModelServer

ROUTER_CLASS = "deployments.router:WarmBucketRouter"


def _actor_options(cfg: AppConfig, **resources: Any) -> dict[str, Any]:
    runtime_env = cfg.replica_runtime().get("runtime_env")   # merged by Ray with the job's runtime_env
    return {**resources, "runtime_env": runtime_env} if runtime_env else dict(resources)


def model_deployment_options(cfg: AppConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": "ModelServer",
        "max_ongoing_requests": cfg.replica_max_ongoing,
        # bounded queue at each caller: past it the handle raises BackPressureError, answered with
        # 503 + Retry-After (deployments/http/fanout.py)
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "ray_actor_options": _actor_options(cfg, num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus),
        "logging_config": cfg.replica_runtime()["logging_config"],
        # loading a 7B checkpoint and compiling/capturing takes minutes on first start
        "health_check_timeout_s": 120,
        "health_check_period_s": cfg.health_check_period_s,
    }
    if cfg.autoscaling is not None:
        opts["autoscaling_config"] = cfg.autoscaling.to_ray()
    else:
        opts["num_replicas"] = cfg.num_replicas
    r = cfg.router
    rr: dict[str, Any] = {"request_routing_stats_period_s": r.stats_period_s,
                          "request_routing_stats_timeout_s": r.stats_timeout_s}
    # local_first: the replicas apply the policy themselves (deployments/colocated.py); under HAProxy Ray
    # refuses a custom request router on the ingress deployment. Their routing stats are still polled.
    if r.enabled and cfg.topology != "local_first":
        rr["request_router_class"] = ROUTER_CLASS
        rr["request_router_kwargs"] = {"imbalance_threshold": r.imbalance_threshold, "hint_ttl_s": r.hint_ttl_s}
    opts["request_router_config"] = RequestRouterConfig(**rr)
    return opts


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    cfg = load_app_config(args)
    cfg_json = cfg.model_dump(mode="json")
    if cfg.colocated:   # the API inside each model replica (deployments/colocated.py)
        from .colocated import ColocatedServer
        return serve.deployment(ColocatedServer).options(**model_deployment_options(cfg)).bind(cfg_json)
    model = serve.deployment(ModelServer).options(**model_deployment_options(cfg)).bind(cfg_json)
    return serve.deployment(Ingress).options(
        name="Ingress", num_replicas=cfg.ingress.num_replicas,
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        max_queued_requests=cfg.ingress.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        # the ingress relays streams: let in-flight ones finish on scale-down/redeploy too
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        ray_actor_options=_actor_options(cfg, num_cpus=cfg.ingress.num_cpus),
        logging_config=cfg.replica_runtime()["logging_config"],
    ).bind(model, cfg_json)
