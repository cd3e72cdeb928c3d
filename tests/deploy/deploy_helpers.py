"""Shared helpers for tests/deploy: paths, tool lookup, YAML loading and a small Dockerfile parser."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
INSTALL_HINT = "run deploy/install-test-tools.sh"

# The documented container command (README.md's Operate section, deploy/README.md).
SERVE_COMMAND = ["quept", "serve", "--host", "0.0.0.0", "--port", "8000"]
SERVE_PORT = 8000


def find_tool(name: str) -> str | None:
    """A command from this interpreter's scripts folder (venv bin/) or from PATH."""
    local = Path(sysconfig.get_path("scripts")) / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


def require_apt_tool(name: str, package: str) -> str:
    """Path to a tool that comes from a Debian package; skip only where apt-get cannot install it."""
    path = find_tool(name)
    if path:
        return path
    if shutil.which("apt-get") is None:
        pytest.skip(f"{name} is not installed and there is no apt-get here to install the Debian "
                    f"package {package!r}; install {name} by other means to run this check")
    pytest.fail(f"{name} not found: {INSTALL_HINT} (apt-get install {package})")


def require_pip_tool(name: str) -> str:
    path = find_tool(name)
    if path:
        return path
    pytest.fail(f"{name} not found: {INSTALL_HINT} (pip install -e '.[test]')")


def require_module(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"cannot import {module} ({exc}): {INSTALL_HINT} "
                    "(pip install -e '.[test]')")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_manifests() -> dict[Path, list[dict[str, Any]]]:
    """Every Kubernetes object under deploy/k8s (files whose documents have apiVersion and kind)."""
    found = {}
    for path in sorted(K8S.rglob("*.yaml")):
        docs = [d for d in load_yaml_docs(path) if isinstance(d, dict) and "apiVersion" in d and "kind" in d]
        if docs:
            found[path] = docs
    return found


def k8s_object(kind: str, name: str = "quept") -> dict[str, Any]:
    matches = [d for docs in k8s_manifests().values() for d in docs
               if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name} under deploy/k8s, found {len(matches)}"
    return matches[0]


@dataclass(frozen=True)
class Instruction:
    stage: int  # index of the FROM this instruction belongs to (-1 before the first FROM)
    keyword: str  # upper case
    args: str  # the rest of the logical line, continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN (after any --flags), else None."""
        rest = self.args
        if self.keyword == "HEALTHCHECK":
            match = re.search(r"\bCMD\s+(.*)$", rest, re.DOTALL)
            if not match:
                return None
            rest = match.group(1)
        rest = rest.strip()
        if not rest.startswith("["):
            return None
        try:
            value = json.loads(rest)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Logical instructions of a Dockerfile (backslash continuations, comments and blank lines handled)."""
    instructions: list[Instruction] = []
    stage = -1
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and buffer):
            continue  # comments (and blank lines inside a continuation) are dropped
        if not line:
            continue
        if line.endswith("\\"):
            buffer += line[:-1].rstrip() + " "
            continue
        logical = buffer + line
        buffer = ""
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, args.strip()))
    assert not buffer, f"{path}: dangling line continuation"
    return instructions


def stage_names(instructions: list[Instruction]) -> dict[str, int]:
    names = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", ins.args, re.IGNORECASE)
            if match:
                names[match.group(1).lower()] = ins.stage
    return names
