"""`python -m app`: serve with uvicorn (uvloop + httptools), configured by FASHION_SERVE_* and these options."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from types import FrameType

import uvicorn

from app.observability import configure_logging
from app.settings import Settings
from models import CheckpointError, load_checkpoint


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default=settings.host, help=f"bind address (default: {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"port (default: {settings.port})")
    default_workers = settings.workers or len(os.sched_getaffinity(0))
    parser.add_argument(
        "--workers", type=int, default=default_workers, help=f"processes (default: one per CPU, {default_workers})"
    )
    args = parser.parse_args(argv)
    configure_logging(settings.log_format, settings.log_level)
    log = logging.getLogger("app")

    # Check the checkpoint before uvicorn starts: a broken one then fails once, with one line and
    # exit 1, instead of a lifespan traceback (or, with workers, every worker failing and restarting).
    # With one worker the process keeps torch imported, so this costs only the (small) file read.
    try:
        load_checkpoint(settings.checkpoint, device="cpu")
    except CheckpointError as exc:
        log.critical("cannot start: checkpoint %s: %s", settings.checkpoint, exc)
        return 1
    if args.workers > 1:
        # Each worker counts its own requests; this directory lets /metrics add them up.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="fashion-serve-metrics-"))

    # uvicorn drains, then re-raises the SIGTERM/SIGINT it caught against the handler it found
    # installed; with this one a drained server exits 0 (a clean stop), not "killed by signal".
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _exit_cleanly)
    uvicorn.run(
        "app.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_config=None,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
