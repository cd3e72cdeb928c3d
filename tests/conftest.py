from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import STARTUP_TIMEOUT_S, ServerProcess


@pytest.fixture(scope="session")
def live_server_url(tmp_path_factory) -> Iterator[str]:
    """Base URL of one real `quept serve` (default model) shared by the e2e and deploy tests.

    QUEPT_E2E_URL points the tests at a server that is already running instead.
    """
    external = os.environ.get("QUEPT_E2E_URL")
    if external:
        yield external.rstrip("/")
        return
    server = ServerProcess(tmp_path_factory.mktemp("server") / "serve.log")
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        yield server.url
    finally:
        server.stop()
