"""gunicorn as the process supervisor, uvicorn (uvloop + httptools, heads bounded) in each worker.

`serve` makes the application in this process (`preload_app`) from the settings it is given,
then gunicorn forks the workers from it. Nothing here touches a GPU or starts a thread before
the fork: the model is loaded by each worker's lifespan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from app.http.protocol import service_protocol
from app.logs import use_service_handler
from app.reload.supervisor import CheckpointSource
from app.settings import Settings


def _worker_class(settings: Settings) -> type[UvicornWorker]:
    class Worker(UvicornWorker):
        CONFIG_KWARGS: dict[str, Any] = {  # noqa: RUF012 (read by UvicornWorker, never mutated)
            "loop": "uvloop",
            "http": service_protocol(settings.max_header_bytes, settings.header_timeout_s),
            "limit_concurrency": settings.max_connections,
            "timeout_graceful_shutdown": settings.shutdown_grace_s,
            "access_log": False,  # the request middleware logs each request with its id
        }

        def run(self) -> None:
            # The service's app has a worker (app.worker) whose protocol also holds connections
            # while it is busy; any other app (bench's references) gets the head limits alone.
            worker = getattr(getattr(self.wsgi, "state", None), "worker", None)
            if worker is not None:
                self.config.http = worker.http_protocol()
            super().run()

    return Worker


class _Logs(glogging.Logger):
    """gunicorn's own messages through the service's handler and format (text or JSON), which
    `python -m app` configured before it made the supervisor."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        use_service_handler(self.error_log)
        # At a worker's exit gunicorn closes the listening socket uvicorn has already closed.
        self.error_log.addFilter(lambda record: not record.getMessage().startswith("Error while closing socket"))


class _Arbiter(Arbiter):
    """SIGINT and SIGQUIT drain like SIGTERM. gunicorn's quick stop sends the workers SIGQUIT,
    which uvicorn workers ignore (uvicorn-worker issue 2): they were SIGKILLed after the grace
    period instead of finishing their requests.

    SIGHUP reloads the model (app/reload) instead of gunicorn's restart of every worker,
    which re-read the path unchecked and shut the service down when the file was broken."""

    source: CheckpointSource | None = None
    on_hup: Callable[[], None] | None = None  # a model repository's reconcile request

    def handle_int(self) -> None:
        self.handle_term()

    def handle_quit(self) -> None:
        self.handle_term()

    def handle_hup(self) -> None:
        if self.on_hup is not None:  # a worker reconciles the repository and validates what it loads
            self.on_hup()
        elif self.source is None:
            super().handle_hup()
        else:  # validated in a separate process while this loop goes on supervising
            self.source.start_reload()

    def manage_workers(self) -> None:  # once per pass of gunicorn's loop (at least once a second)
        super().manage_workers()
        if self.source is not None:
            self.source.poll()


class _Supervisor(BaseApplication):
    """gunicorn's application: its options and the app, made once here and forked into every worker."""

    def __init__(
        self,
        application: Callable[[], Any],
        options: dict[str, Any],
        source: CheckpointSource | None,
        on_hup: Callable[[], None] | None = None,
    ) -> None:
        self.application = application
        self.options = options
        self.source = source
        self.on_hup = on_hup
        super().__init__()

    def run(self) -> None:
        arbiter = _Arbiter(self)
        arbiter.source = self.source
        arbiter.on_hup = self.on_hup
        arbiter.run()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.application()


class AddressInUse(Exception):
    """The address cannot be served: something else is bound there, or it does not resolve."""


def claim_address(host: str, port: int) -> socket.socket:
    """Refuse an address another socket holds, then hold it for as long as the server runs.

    Each worker binds its own socket with SO_REUSEPORT (so the kernel spreads connections
    evenly over the workers); a second server started on the same port would join them
    silently instead of failing. So: first bind without SO_REUSEPORT, which fails if
    anything is bound there; then keep a bound, never-listening SO_REUSEPORT socket open in
    this process, beside which the workers can bind but another server's check cannot.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
            probe.bind((host, port))
        claim = socket.socket(family, socket.SOCK_STREAM)
        claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        claim.bind((host, port))
    except OSError as exc:
        raise AddressInUse(f"{host}:{port}: {exc.strerror or exc}") from None
    return claim


def _allow_descriptors(wanted: int) -> None:
    """Raise this process's (and so its workers') open-file limit towards `wanted`, as far as the
    hard limit allows: each connection is a descriptor, and a soft limit of 1,024 would fail
    accepts long before `max_connections`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logging.getLogger("app").warning(
            "open files are limited to %d: fewer than max_connections x workers (%d) can connect", target, wanted
        )


def serve(
    settings: Settings,
    application: Callable[[], Any],
    source: CheckpointSource | None = None,
    on_hup: Callable[[], None] | None = None,
) -> int:
    """Serve the app `application` makes on `settings.host`, `.port` with `settings.workers`
    processes until SIGTERM, SIGINT or SIGQUIT, then drain and return 0; SIGHUP reloads the model
    from `source`, or calls `on_hup` (a model repository's reconcile).

    Raises AddressInUse before starting; gunicorn itself exits 3 if a worker cannot boot.
    """
    host, port, workers = settings.host, settings.port, settings.workers or 1
    claim = claim_address(host, port)
    # gRPC's port too: a plain socket, no grpc object (the workers create their gRPC servers).
    grpc_claim: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if settings.grpc_port:
        try:
            grpc_claim = claim_address(host, settings.grpc_port)
        except AddressInUse:
            claim.close()
            raise
    _allow_descriptors(settings.max_connections * workers + 256)
    options: dict[str, Any] = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": _worker_class(settings),
        "preload_app": True,
        # One listening socket per worker: the kernel balances connections across them. With a
        # shared socket, the first worker to wake took most of a burst of new connections and
        # kept them for as long as they stayed open (docs/performance.md).
        "reuse_port": True,
        "keepalive": settings.keep_alive_s,
        # uvicorn drains within shutdown_grace_s (then the batcher gets 1 s); gunicorn's hard
        # stop comes after that, still inside Docker's 10 s with the default grace of 8 s.
        "graceful_timeout": settings.shutdown_grace_s + 1,
        # Heartbeat files: /dev/shm is a tmpfs even where the root filesystem is read-only.
        "worker_tmp_dir": "/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
        "logger_class": _Logs,
        "loglevel": settings.log_level,
        "accesslog": None,
        "errorlog": "-",
        "proc_name": "fashion-serve",
        "control_socket_disable": True,  # no runtime control socket in $HOME or $XDG_RUNTIME_DIR
    }
    grpc_note = f", gRPC on port {settings.grpc_port}" if settings.grpc_port else ""
    logging.getLogger("app").info("serving on http://%s%s with %d workers", options["bind"], grpc_note, workers)
    with claim, grpc_claim:
        _Supervisor(application, options, source, on_hup).run()
    return 0
