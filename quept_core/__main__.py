"""`python -m quept_core` is the `quept` command (useful where the package is not installed)."""

from quept_core.cli import app

app(prog_name="quept")
