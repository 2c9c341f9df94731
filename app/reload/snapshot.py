"""What the supervisor and its workers share about reloads: the reload counts beside the validated
snapshot (whose path the supervisor hands its workers: `app.worker.Handoff`), and the
validation's verdict line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

COUNTS_FILE = "reloads.json"
VALID = "valid"  # the last line app.reload.validate prints for a checkpoint that serves


def _record(snapshot: Path | None) -> dict[str, Any]:
    if snapshot is not None:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((snapshot.parent / COUNTS_FILE).read_text())
            if isinstance(record, dict):
                return record
    return {}


def reload_counts(snapshot: Path | None) -> dict[str, int]:
    """Reloads so far by result, as the supervisor recorded them beside the snapshot."""
    record = _record(snapshot)
    return {result: int(record.get(result, 0)) for result in ("success", "failure")}


def last_reload(snapshot: Path | None) -> dict[str, Any] | None:
    """The last reload's outcome: `result`, `finished_at` (Unix time) and the refusal's `reason`."""
    last = _record(snapshot).get("last")
    return last if isinstance(last, dict) else None
