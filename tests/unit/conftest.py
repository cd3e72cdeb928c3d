from __future__ import annotations

import threading

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from quept_core.io.paths import cache_dir
from quept_core.runtime.kernels.native import load_kernels
from service.app import create_app
from service.settings import Settings
from tests.support import free_port, wait_for, wait_ready
from tests.unit.fakes import FakeBackend, FakeEngine


@pytest.fixture
def make_client():
    """A TestClient on the real app with a fake backend, ready to serve."""
    opened: list[TestClient] = []

    def make(engine: FakeEngine | None = None, **settings) -> TestClient:
        backend = FakeBackend(engine)
        app = create_app(Settings(**settings), loader=lambda _: backend)
        client = TestClient(app).__enter__()
        opened.append(client)
        wait_for(lambda: client.get("/ready").status_code == 200, timeout_s=10)
        client.backend = backend
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def live_fake_server():
    """The real app under uvicorn on a loopback port, with a fake backend (sockets, disconnects)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(engine: FakeEngine | None = None, **settings) -> tuple[str, FakeBackend]:
        backend = FakeBackend(engine)
        app = create_app(Settings(**settings), loader=lambda _: backend)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 30, thread.is_alive)
        return url, backend

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids thread hand-off costs that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def portable():
    """The kernels as CPUs without AVX-512 build them (`torch.ops.quept_portable`, `torch.classes.quept_portable`)."""
    folder = cache_dir() / "kernels" / f"torch-{torch.__version__}-portable-test"
    try:
        load_kernels(folder, "quept_planes_portable", cflags=("-O2", "-DQUEPT_PORTABLE", "-DQUEPT_OPS=quept_portable"),
                     ldflags=())
    except (OSError, RuntimeError) as error:
        pytest.skip(f"no C++ toolchain: {error}")
    return torch.ops.quept_portable.planes_gemv.default
