"""The one object per worker (app.worker.Worker): it owns the worker's parts, the gunicorn worker
runs its HTTP protocol, and the hold at the socket works through a real uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from uvicorn_worker import UvicornWorker

from app.main import create_app
from app.server import _worker_class
from app.settings import Settings
from tests.helpers import multipart, png, wait_for


def test_each_app_has_its_own_worker_whose_protocol_holds_with_its_own_backpressure(settings: Settings) -> None:
    first, second = create_app(settings).state.worker, create_app(settings).state.worker
    assert first.backpressure is not second.backpressure, "no back-pressure shared through a module global"
    assert first.http_protocol().backpressure is first.backpressure
    assert first.backpressure.busy is None, "nothing is held before the model is ready"
    app = create_app(settings)
    with TestClient(app):
        worker = app.state.worker
        assert worker.backpressure.busy == worker.plane.backlogged, "once ready, held while the queue is long"


def test_the_gunicorn_worker_runs_the_apps_own_protocol(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[object] = []
    monkeypatch.setattr(UvicornWorker, "run", lambda self: ran.append(self.config.http))
    worker_class = _worker_class(settings)
    default = worker_class.CONFIG_KWARGS["http"]
    for app, expected in ((create_app(settings), "the app's"), (FastAPI(), "the default")):
        gunicorn_worker = worker_class.__new__(worker_class)
        gunicorn_worker.wsgi = app
        gunicorn_worker.config = SimpleNamespace(http=default)
        gunicorn_worker.run()
        if expected == "the app's":
            assert ran[-1].backpressure is app.state.worker.backpressure
        else:
            assert ran[-1] is default and default.backpressure is None, "another app: head limits, no hold"


def _post_twice(port: int) -> float:
    """Two /predict requests, one after the other on one keep-alive connection: the seconds between
    the first answer and the second."""
    body, content_type = multipart([("a.png", png())])
    request = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        answered = []
        for _ in range(2):
            conn.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                data += conn.recv(65536)
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            answered.append(time.monotonic())
    return answered[1] - answered[0]


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])


def test_a_busy_worker_holds_the_next_request_at_the_socket_and_releases_it(settings: Settings) -> None:
    """Through uvicorn itself (the protocol's uvicorn internals are listed in test_internals): an
    inference answer while busy stops reading the connection until `max_hold_s` at the latest."""
    app = create_app(settings)
    worker = app.state.worker
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=worker.http_protocol(), log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started and worker.plane.health.is_ready)
        worker.backpressure.max_hold_s = 0.6
        worker.backpressure.busy = lambda: True
        held = _post_twice(port)
        worker.backpressure.busy = lambda: False
        free = _post_twice(port)
    finally:
        server.should_exit = True
        thread.join(10)
    assert held >= 0.5, f"busy: the second request was read {held:.3f} s after the first answer"
    assert free < 0.4, f"not busy: the second request waited {free:.3f} s"
