"""Every script under benchmarks/ imports against the current package (they run outside the suite)."""

import runpy
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[2] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_benchmark_script_imports(script):
    namespace = runpy.run_path(str(script), run_name="imported_by_test")
    assert callable(namespace.get("main")), f"{script.name} has no main()"
