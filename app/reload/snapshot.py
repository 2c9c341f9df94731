"""What the supervisor and its workers share about reloads: where the validated snapshot lies
(an environment variable the supervisor sets for its workers), the reload counts beside it,
and the validation's verdict line."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

SNAPSHOT_ENV = "FASHION_SERVE_MODEL_SNAPSHOT"  # set by the supervisor for its workers; internal
COUNTS_FILE = "reloads.json"
VALID = "valid"  # the last line app.reload.validate prints for a checkpoint that serves


def snapshot_path() -> Path | None:
    """The validated checkpoint this worker serves, when run under `python -m app`."""
    value = os.environ.get(SNAPSHOT_ENV)
    return Path(value) if value else None


def reload_counts(snapshot: Path | None) -> dict[str, int]:
    """Reloads so far by result, as the supervisor recorded them beside the snapshot."""
    counts = {"success": 0, "failure": 0}
    if snapshot is not None:
        with contextlib.suppress(OSError, ValueError):
            counts.update(json.loads((snapshot.parent / COUNTS_FILE).read_text()))
    return counts
