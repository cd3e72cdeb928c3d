"""Run the app under uvicorn, with the contract's SIGTERM drain and one-line start-up errors."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from types import FrameType

import uvicorn

from service.app import create_app
from service.observability.logs import configure_logging
from service.settings import Settings
from service.state import LOADING, WARMING

log = logging.getLogger(__name__)

_GRACE_S = 5.0  # after the drain, how long uvicorn waits for responses to finish sending


class DrainingServer(uvicorn.Server):
    """uvicorn closes its socket at once on SIGTERM; the contract wants /ready to answer 503 and
    in-flight requests to finish first. So the first SIGTERM (or Ctrl-C) drains, then exits 0;
    a second one exits at once."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.phase in (LOADING, WARMING) and sig in (signal.SIGTERM, signal.SIGINT):
            self._exit_during_start_up(sig)
        if self._draining or self._loop is None or sig not in (signal.SIGTERM, signal.SIGINT):
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))

    @staticmethod
    def _exit_during_start_up(sig: int) -> None:
        """Nothing is in flight before ready, and every file start-up writes (model cache, calibration
        checkpoints, artifact) is committed by an atomic rename, so stopping here loses no work. A plain
        interpreter exit would tear torch down under the loading thread and abort the process."""
        log.info("stopped during start-up", extra={"signal": signal.Signals(sig).name})
        logging.shutdown()
        os._exit(0)

    async def _drain_then_exit(self) -> None:
        await self.state.drain()
        self.should_exit = True


def run_server(settings: Settings) -> str | None:
    """Serve until SIGTERM; returns the start-up failure message, if start-up failed."""
    configure_logging(settings.log_level)
    failure: list[str] = []
    server: DrainingServer | None = None

    def on_fatal(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=_GRACE_S, lifespan="on")
    server = DrainingServer(config, app.state.service)
    server.run()
    return failure[0] if failure else None
