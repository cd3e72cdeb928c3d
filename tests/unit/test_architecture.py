"""The layers of pyproject's import-linter contracts hold, and a reverse import would break them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# Library settings of quept_core itself; a server setting is passed in by the service, never read here.
LIBRARY_VARIABLES = {"QUEPT_CACHE_DIR", "QUEPT_NATIVE"}


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the packages under `root`, with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy_of_the_packages(tmp_path: Path) -> Path:
    for package in ("quept_core", "service"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def plant(root: Path, module: str, line: str) -> None:
    path = root / module
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_repository_keeps_every_contract():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("quept_core/runtime/sampling.py", "import service.settings", "service is built on quept_core"),
    ("quept_core/runtime/sampling.py", "import quept_core.calibration.loop", "serving never pulls in calibration"),
    ("quept_core/quant/grid.py", "import quept_core.planning.plan", "quept_core: tools, then"),
    ("service/engine/scheduler.py", "import service.api.schemas", "service: entry points"),
])
def test_a_planted_reverse_import_breaks_its_contract(copy_of_the_packages, module, line, contract):
    plant(copy_of_the_packages, module, line)
    result = lint(copy_of_the_packages)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout


def test_quept_core_reads_no_server_setting():
    found = set()
    for path in (REPO / "quept_core").rglob("*.py"):
        found |= set(re.findall(r"(?:environ(?:\.get)?|getenv)\s*[(\[]\s*[\"'](QUEPT_\w+)", path.read_text()))
    assert found <= LIBRARY_VARIABLES, f"quept_core reads {sorted(found - LIBRARY_VARIABLES)}"
