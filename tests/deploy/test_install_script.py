"""deploy/install-test-tools.sh: valid bash, and a quiet no-op once the tools are there."""

import os
import subprocess

from deploy_helpers import DEPLOY, require_apt_tool, require_module, require_pip_tool

SCRIPT = DEPLOY / "install-test-tools.sh"


def test_script_is_valid_bash_and_executable():
    assert os.access(SCRIPT, os.X_OK)
    result = subprocess.run(["bash", "-n", str(SCRIPT)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_script_is_a_quiet_no_op_when_tools_are_present():
    require_apt_tool("promtool", "prometheus")
    require_apt_tool("docker-compose", "docker-compose")
    require_pip_tool("hadolint")
    require_pip_tool("check-jsonschema")
    require_module("kubernetes_validate")
    require_module("cloudcoil.models.keda.v1alpha1")
    result = subprocess.run(["bash", str(SCRIPT)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
