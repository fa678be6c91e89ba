"""The shipped serve configs validate against the one config model (a misspelt or removed field in either
file fails here, before `serve run` meets it on a GPU host)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.config import AppConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_shipped_serve_config_validates(name):
    doc = yaml.safe_load((ROOT / name).read_text())
    app = AppConfig.model_validate(doc["applications"][0]["args"])
    assert app.engine.model
    if name == "serve_config.gpu.yaml":
        assert app.engine.device == "cuda" and app.engine.spin_s == 0.5
    # both ship the P99-latency autoscaling policy on
    assert app.autoscaling is not None and app.autoscaling.policy.policy_function.endswith("LatencyAutoscalingPolicy")
    assert app.autoscaling.min_replicas == 1 and app.autoscaling.max_replicas >= 2


@pytest.mark.parametrize("autoscaling,needle", [
    ({"min_replicas": 1, "max_replicas": 2, "policy": {"policy_kwargs": {"p99_ttft_ms": -5}}}, "p99_ttft_ms"),
    ({"min_replicas": 1, "max_replicas": 2, "policy": {"policy_kwargs": {"p99_ttfb_ms": 50}}}, "p99_ttfb_ms"),
    ({"min_replicas": 1, "max_replicas": 2, "policy": {"policy_kwargs": {}}}, "p99_ttft_ms"),
    ({"min_replicas": 3, "max_replicas": 2, "policy": None}, "above max_replicas"),
    ({"max_replica": 2}, "max_replica"),
])
def test_a_bad_autoscaling_setting_fails_at_deploy_time(autoscaling, needle):
    from deployments.config import ConfigError, load_app_config

    with pytest.raises(ConfigError, match=needle):
        load_app_config({"engine": {"model": "tiny", "device": "cpu"}, "autoscaling": autoscaling})


def test_the_latency_policy_reaches_ray_as_its_autoscaling_config():
    from deployments.app import model_deployment_options
    from deployments.config import load_app_config

    cfg = load_app_config({"engine": {"model": "tiny", "device": "cpu"}, "autoscaling": {
        "min_replicas": 1, "max_replicas": 2, "policy": {"policy_kwargs": {"p99_ttft_ms": 80}}}})
    opts = model_deployment_options(cfg)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "policy": {
        "policy_function": "autoscale.ray_policy:LatencyAutoscalingPolicy", "policy_kwargs": {"p99_ttft_ms": 80}}}
    assert "num_replicas" not in opts and opts["max_ongoing_requests"] == 8 + 7   # 8 KV slots (CPU) + replica_queue 7


def test_engine_spin_must_not_be_negative():
    with pytest.raises(ValueError, match="spin_s"):
        AppConfig.model_validate({"engine": {"spin_s": -1}})
