"""A start-up failure with a self-explaining message is logged as one line, without a traceback."""

from __future__ import annotations

import logging
import threading

import pytest
from fastapi.testclient import TestClient

from quept_core.artifact.store import ArtifactError
from service.app import create_app
from service.settings import Settings


def failing_loader(error: Exception):
    def load(_settings):
        raise error

    return load


@pytest.mark.parametrize(("error", "traceback"), [(ArtifactError("art: checksum mismatch"), False),
                                                   (RuntimeError("a bug"), True)])
def test_start_up_failure_is_logged_with_a_traceback_only_for_bugs(caplog, error, traceback):
    heard = threading.Event()
    app = create_app(Settings(), loader=failing_loader(error), on_fatal=lambda _: heard.set())
    with caplog.at_level(logging.ERROR, logger="service.state"), TestClient(app):
        assert heard.wait(10)
    [record] = [r for r in caplog.records if r.getMessage() == "start-up failed"]
    assert record.error == str(error)
    assert bool(record.exc_info) == traceback
