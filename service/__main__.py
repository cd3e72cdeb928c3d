"""`python -m service` is the `quept` command (useful where the package is not installed)."""

from service.cli import app

app(prog_name="quept")
