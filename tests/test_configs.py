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


def test_engine_spin_must_not_be_negative():
    with pytest.raises(ValueError, match="spin_s"):
        AppConfig.model_validate({"engine": {"spin_s": -1}})
