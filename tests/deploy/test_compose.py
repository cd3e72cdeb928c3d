"""docker-compose.yml: valid for Compose v1 (Debian's docker-compose) and the Compose Specification."""

import re
import subprocess

import pytest
from deploy_helpers import REPO_ROOT, load_yaml, require_apt_tool, require_pip_tool

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE_FILE)


def test_docker_compose_config_validates():
    tool = require_apt_tool("docker-compose", "docker-compose")
    result = subprocess.run([tool, "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE), "config", "-q"],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_specification_schema_validates():
    tool = require_pip_tool("check-jsonschema")
    result = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_and_published_ports(compose):
    services = compose["services"]
    assert set(services) == {"quept", "prometheus", "grafana"}
    assert services["quept"]["build"]["dockerfile"] == "Dockerfile"
    assert (REPO_ROOT / services["quept"]["build"]["context"] / "Dockerfile").is_file()
    assert services["quept"]["ports"] == ["8000:8000"]
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]


def test_third_party_images_are_pinned(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", image), \
            f"{name}: pin an exact version tag, not {image!r}"


def test_bind_mounts_exist(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"


def test_stop_grace_period_covers_the_drain(compose):
    service = compose["services"]["quept"]
    drain = int(service.get("environment", {}).get("QUEPT_DRAIN_TIMEOUT_S", 30))
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace and int(grace.group(1)) >= drain + 5, "SIGKILL must not cut the drain short"
