"""The worker's half of a reload: swap in the supervisor's new snapshot when it appears."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from app.dataplane import DataPlane
from app.served_model import ServedModel

logger = logging.getLogger("app")
SNAPSHOT_POLL_S = 0.5  # how often a worker looks for a reloaded model (one stat of a tmpfs file)

Loader = Callable[[Path], Awaitable[ServedModel]]


async def follow_snapshot(plane: DataPlane, snapshot: Path, load: Loader, seen: os.stat_result) -> None:
    """Swap in the supervisor's new snapshot when it appears (a validated reload): loaded and
    warmed up by `load` beside the current model, which keeps serving until the swap. Requests
    already holding the old model finish on it; its inference thread stops once none can be left.

    `seen` is the snapshot's stat taken before the model now serving was loaded from it: taken
    after, a reload installed during that load went unnoticed, and the worker served the old model
    until it died (found in CI: a worker starting while a reload was validated)."""
    retiring: set[asyncio.Task[None]] = set()  # kept referenced until done
    while True:
        await asyncio.sleep(SNAPSHOT_POLL_S)
        try:
            now = os.stat(snapshot)
        except FileNotFoundError:  # the supervisor is exiting
            continue
        if (now.st_ino, now.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns):
            continue
        seen = now
        try:
            model = await load(snapshot)
        except Exception as exc:  # validated by the supervisor, so unexpected: keep serving the old one
            logger.error("reload: the new model did not load in this worker, keeping the old one: %r", exc)
            continue
        old = plane.serve(model)
        logger.info("reloaded: now serving %s", model.summary())
        if old is not None:
            retiring.add(asyncio.create_task(retire(old, plane.settings.body_timeout_s + 5)))
            retiring = {task for task in retiring if not task.done()}
        del old, model  # retire holds the old model now, and lets it go


async def retire(old: ServedModel, delay: float) -> None:
    """End a replaced model's inference thread once no request can still reach it (one admitted
    before the swap has at most body_timeout_s to send its body), and let it be freed."""
    await asyncio.sleep(delay)
    # Dropping the batcher breaks the model <-> batcher (run_batch) cycle, so reference counting
    # frees the model: the collector never would, as start-up froze it (gc.freeze).
    batcher, old.batcher = old.batcher, None
    if batcher is not None:
        batcher.close()
        await run_in_threadpool(batcher.join, 5.0)
