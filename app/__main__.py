"""`python -m app`: serve on pre-forked worker processes, configured by FASHION_SERVE_* and these options.

gunicorn supervises; each worker is uvicorn (uvloop + httptools). The application, torch
included, is imported once here and the workers are forked from this process, so start-up
pays for one torch import instead of one per worker, and a worker that dies is replaced
in milliseconds. Each worker loads the model itself, after the fork.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from functools import partial
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
    # The options win over the environment; from here on the settings travel explicitly.
    settings = settings.model_copy(update={"host": args.host, "port": args.port, "workers": args.workers})
    with _SupervisorExit() as at_exit:
        if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # Each worker counts its own requests; this directory lets /metrics add them up.
            # prometheus_client reads this variable once, at import (below): the one setting
            # that must travel through the environment.
            metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fashion-serve-metrics-")
            at_exit.callback(shutil.rmtree, metrics_dir, ignore_errors=True)
        status = _serve(settings, at_exit)
    return status


class _SupervisorExit(contextlib.ExitStack):
    """The supervisor's clean-up. The workers are forked deep inside `serve` and unwind through
    the same frames when they exit: they skip it."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def __exit__(self, *exc: object) -> bool:
        if os.getpid() != self.pid:
            self.pop_all()
            return False
        return bool(super().__exit__(*exc))  # type: ignore[arg-type]


def _serve(settings: Settings, at_exit: contextlib.ExitStack) -> int:
    """Configure logging (once: the workers inherit it), check the keys, prepare what the workers
    are handed (a checked copy of the checkpoint, or the repository's shared state), and supervise."""
    from app.auth import ApiKeyError, load_api_keys
    from app.logs import configure_logging
    from app.main import create_app
    from app.reload.supervisor import CheckpointSource
    from app.repository.shared import SharedState
    from app.server import AddressInUse, serve
    from app.worker import Handoff
    from models import CheckpointError

    configure_logging(settings.log_format, settings.log_level)
    log = logging.getLogger("app")
    try:
        load_api_keys(settings)
    except ApiKeyError as exc:
        log.critical("cannot start: %s", exc)
        return 1
    source: CheckpointSource | None = None
    on_hup: Callable[[], None] | None = None
    if settings.model_repository is not None:
        # The workers share one state directory (app.repository.shared); SIGHUP asks a worker to
        # reconcile with the disk.
        root = settings.model_repository
        if not root.is_dir():
            log.critical("cannot start: FASHION_SERVE_MODEL_REPOSITORY %s is not a directory", root)
            return 1
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        shared = SharedState(Path(tempfile.mkdtemp(prefix="fashion-serve-repository-", dir=shm)))
        at_exit.callback(shutil.rmtree, shared.directory, ignore_errors=True)
        handoff, on_hup = Handoff(repository_state=shared.directory), shared.request_reconcile
    else:
        # The workers serve a private copy of the checkpoint, checked here before any worker
        # starts (a broken one then fails once, with one line and exit 1), never the path
        # itself: a worker that replaces a dead one serves the same model. SIGHUP replaces the
        # copy (app/reload). torch stays imported for the workers.
        source = CheckpointSource.create(settings.checkpoint, settings.device)
        at_exit.callback(source.remove)
        try:
            source.install()
        except CheckpointError as exc:
            log.critical("cannot start: checkpoint %s: %s", settings.checkpoint, exc)
            return 1
        handoff = Handoff(snapshot=source.snapshot)
    try:
        return serve(settings, partial(create_app, settings, handoff), source=source, on_hup=on_hup)
    except AddressInUse as exc:
        log.critical("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
