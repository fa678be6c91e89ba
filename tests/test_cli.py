"""The `hybridserve` command as a new user meets it: --version, and `warm` on a machine without a GPU."""
from __future__ import annotations

import subprocess
import sys

import pytest

from deployments import cli


def test_version_prints_the_package_version():
    out = subprocess.run([sys.executable, "-m", "deployments.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"hybridserve {cli.version()}"
    assert cli.version()[0].isdigit()


@pytest.mark.skipif(cli._has_gpu(), reason="this host has a GPU: warm would run")
def test_warm_without_a_gpu_says_it_needs_one(capsys, tmp_path):
    assert cli.main(["warm", "--preset", "tiny", "--store", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "needs a CUDA GPU" in out and "Traceback" not in out and not any(tmp_path.iterdir())
