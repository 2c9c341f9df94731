"""gunicorn as the process supervisor, uvicorn (uvloop + httptools) in each worker.

`serve` imports the application in this process (`preload_app`), then gunicorn forks the
workers from it. Nothing here touches a GPU or starts a thread before the fork: the model
is loaded by each worker's lifespan.
"""

from __future__ import annotations

import logging
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from uvicorn_worker import UvicornWorker

from app.observability import configure_logging
from app.settings import Settings


def _worker_class(settings: Settings) -> type[UvicornWorker]:
    class Worker(UvicornWorker):
        CONFIG_KWARGS: dict[str, Any] = {  # noqa: RUF012 (read by UvicornWorker, never mutated)
            "loop": "uvloop",
            "http": "httptools",
            "limit_concurrency": settings.max_connections,
            "timeout_graceful_shutdown": settings.shutdown_grace_s,
            "access_log": False,  # the request middleware logs each request with its id
        }

    return Worker


def _logger_class(settings: Settings) -> type[glogging.Logger]:
    class Logs(glogging.Logger):
        """gunicorn's own messages through the service's handler and format (text or JSON)."""

        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            configure_logging(settings.log_format, settings.log_level)
            # At a worker's exit gunicorn closes the listening socket uvicorn has already closed.
            self.error_log.addFilter(lambda record: not record.getMessage().startswith("Error while closing socket"))

    return Logs


class _Supervisor(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from app.main import app

        return app


def serve(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run until SIGTERM or SIGINT (then drain and return 0); gunicorn exits 3 if a worker cannot boot."""
    options: dict[str, Any] = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": _worker_class(settings),
        "preload_app": True,
        "keepalive": settings.keep_alive_s,
        # uvicorn drains within shutdown_grace_s; gunicorn's hard stop comes a little later.
        "graceful_timeout": settings.shutdown_grace_s + 2,
        "logger_class": _logger_class(settings),
        "loglevel": settings.log_level,
        "accesslog": None,
        "errorlog": "-",
        "proc_name": "fashion-serve",
        "control_socket_disable": True,  # no runtime control socket in $HOME or $XDG_RUNTIME_DIR
    }
    logging.getLogger("app").debug("gunicorn options: %s", options)
    _Supervisor(options).run()
    return 0
