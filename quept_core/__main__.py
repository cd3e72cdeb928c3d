"""`python -m quept_core` runs the `quept` command."""

from quept_core.cli import app

app()
