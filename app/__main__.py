"""`python -m app`: serve on pre-forked worker processes, configured by FASHION_SERVE_* and these options.

gunicorn supervises; each worker is uvicorn (uvloop + httptools). The application, torch
included, is imported once here and the workers are forked from this process, so start-up
pays for one torch import instead of one per worker, and a worker that dies is replaced
in milliseconds. Each worker loads the model itself, after the fork.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from app.settings import Settings

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD", or "max PERIOD" without a quota


def usable_cpus(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota when there is
    one (Docker's --cpus, Kubernetes' CPU limit), rounded up: a quota of 1.5 CPUs gives 2."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default=settings.host, help=f"bind address (default: {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"port (default: {settings.port})")
    default_workers = settings.workers or usable_cpus()
    parser.add_argument(
        "--workers",
        type=_positive,
        default=default_workers,
        help=f"processes (default: one per CPU, {default_workers})",
    )
    args = parser.parse_args(argv)
    if args.port == 0 and args.workers > 1:
        parser.error("--port 0 (any free port) would give each worker a different port; name a port")
    metrics_dir = None
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Each worker counts its own requests; this directory lets /metrics add them up. It must
        # be set before prometheus_client is imported (below), which reads it once.
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fashion-serve-metrics-")
    # The workers bind gRPC on the same host as HTTP; they read it from their Settings.
    os.environ["FASHION_SERVE_HOST"] = args.host
    supervisor = os.getpid()
    try:
        return _serve(settings, args.host, args.port, args.workers)
    finally:
        # Workers are forked from inside _serve and unwind through here when they exit: only the
        # supervisor, at its own exit, removes the directory.
        if metrics_dir and os.getpid() == supervisor:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(settings: Settings, host: str, port: int, workers: int) -> int:
    from app.auth import ApiKeyError, load_api_keys
    from app.logs import configure_logging
    from app.reload.snapshot import SNAPSHOT_ENV
    from app.reload.supervisor import CheckpointSource
    from models import CheckpointError

    configure_logging(settings.log_format, settings.log_level)
    log = logging.getLogger("app")
    try:
        load_api_keys(settings)
    except ApiKeyError as exc:
        log.critical("cannot start: %s", exc)
        return 1
    if settings.model_repository is not None:
        return _serve_repository(settings, host, port, workers)
    # The workers serve a private copy of the checkpoint, checked here before any worker starts
    # (a broken one then fails once, with one line and exit 1), never the path itself: a worker
    # that replaces a dead one serves the same model. SIGHUP replaces the copy (app/reload).
    # torch stays imported for the workers.
    source = CheckpointSource.create(settings.checkpoint, settings.device)
    supervisor = os.getpid()
    try:
        try:
            source.install()
        except CheckpointError as exc:
            log.critical("cannot start: checkpoint %s: %s", settings.checkpoint, exc)
            return 1
        os.environ[SNAPSHOT_ENV] = str(source.snapshot)

        from app.server import AddressInUse, serve

        try:
            return serve(settings, host, port, workers, source=source)
        except AddressInUse as exc:
            log.critical("cannot start: %s", exc)
            return 1
    finally:
        if os.getpid() == supervisor:  # workers unwind through here too
            source.remove()


def _serve_repository(settings: Settings, host: str, port: int, workers: int) -> int:
    """Serve a model repository: the workers share one state directory (app.repository.shared),
    which this process creates and removes; SIGHUP asks a worker to reconcile with the disk."""
    from app.repository.shared import STATE_DIR_ENV, SharedState
    from app.server import AddressInUse, serve

    log = logging.getLogger("app")
    root = settings.model_repository
    if root is None or not root.is_dir():
        log.critical("cannot start: FASHION_SERVE_MODEL_REPOSITORY %s is not a directory", root)
        return 1
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    shared = SharedState(Path(tempfile.mkdtemp(prefix="fashion-serve-repository-", dir=shm)))
    os.environ[STATE_DIR_ENV] = str(shared.directory)
    supervisor = os.getpid()
    try:
        return serve(settings, host, port, workers, on_hup=shared.request_reconcile)
    except AddressInUse as exc:
        log.critical("cannot start: %s", exc)
        return 1
    finally:
        if os.getpid() == supervisor:
            shutil.rmtree(shared.directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
