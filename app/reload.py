"""One model at a time, reloaded on purpose.

The supervisor (`python -m app`) copies the configured checkpoint's bytes into a private
snapshot once they are validated, and the workers load that snapshot, never the configured
path: a worker that replaces a dead one serves the same model as the others, whatever has
happened to the file since. `SIGHUP` asks for a reload: the file is read again, validated
completely in a separate process (everything start-up checks, on the configured device, plus
a warm-up forward pass), and only then does it become the snapshot, which every worker swaps
in between batches (`app.main`). A reload that fails changes nothing but a log line and
`fashion_serve_model_reloads_total{result="failure"}`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from models.checkpoint import MAX_FILE_BYTES, CheckpointError, load_checkpoint

if TYPE_CHECKING:
    from app.runtime import Runtime

logger = logging.getLogger("app")

SNAPSHOT_ENV = "FASHION_SERVE_MODEL_SNAPSHOT"  # set by the supervisor for its workers; internal
VALIDATE_TIMEOUT_S = 300


def snapshot_path() -> Path | None:
    """The validated checkpoint this worker serves, when run under `python -m app`."""
    value = os.environ.get(SNAPSHOT_ENV)
    return Path(value) if value else None


def reload_counts(snapshot: Path | None) -> dict[str, int]:
    """Reloads so far by result, as the supervisor recorded them beside the snapshot."""
    counts = {"success": 0, "failure": 0}
    if snapshot is not None:
        with contextlib.suppress(OSError, ValueError):
            counts.update(json.loads((snapshot.parent / "reloads.json").read_text()))
    return counts


class CheckpointSource:
    """The supervisor's side: the configured path, the snapshot the workers load, the counts."""

    def __init__(self, configured: Path, directory: Path, device: str) -> None:
        self.configured = configured
        self.directory = directory
        self.device = device
        self.snapshot = directory / "current.pt"
        self.counts = {"success": 0, "failure": 0}

    @classmethod
    def create(cls, configured: Path, device: str) -> CheckpointSource:
        """A private directory for the snapshot: /dev/shm where writable with room for two
        copies (a tmpfs even under a read-only root filesystem; Docker gives it 64 MB), else
        the temporary directory."""
        size = configured.stat().st_size if configured.is_file() else 0
        shm = Path("/dev/shm")
        roomy = os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * size + (1 << 20)
        directory = tempfile.mkdtemp(prefix="fashion-serve-model-", dir=shm if roomy else None)
        return cls(configured, Path(directory), device)

    def _copy(self) -> Path:
        """The configured file's bytes, read once, as a candidate beside the snapshot."""
        candidate = self.directory / "candidate.pt"
        if not self.configured.is_file():
            raise CheckpointError(f"checkpoint {self.configured} does not exist (or is not a file)")
        with self.configured.open("rb") as source:
            data = source.read(MAX_FILE_BYTES + 1)  # load_checkpoint refuses the oversized copy
        candidate.write_bytes(data)
        return candidate

    def install(self) -> None:
        """Start-up: copy the configured file and check the copy as the workers will load it
        (raises CheckpointError, saying the configured path)."""
        try:
            candidate = self._copy()
            load_checkpoint(candidate, device="cpu")
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.configured}: {exc.strerror or exc}") from None
        except CheckpointError as exc:
            raise CheckpointError(self._reason(str(exc))) from None
        os.replace(candidate, self.snapshot)
        self._write_counts()

    def _reason(self, message: str) -> str:
        """A message about the private copy, told about the configured path."""
        return message.replace(str(self.directory / "candidate.pt"), str(self.configured))

    def reload(self) -> bool:
        """Validate the configured file completely; on success it becomes the snapshot."""
        try:
            candidate = self._copy()
        except CheckpointError as exc:
            return self._failed(str(exc))
        except OSError as exc:
            return self._failed(f"cannot read {self.configured}: {exc.strerror or exc}")
        try:
            check = subprocess.run(
                [sys.executable, "-m", "app.validate", str(candidate)],
                capture_output=True,
                text=True,
                timeout=VALIDATE_TIMEOUT_S,
                env={**os.environ, "FASHION_SERVE_DEVICE": self.device},
            )
        except subprocess.TimeoutExpired:
            candidate.unlink(missing_ok=True)
            return self._failed(f"validation took over {VALIDATE_TIMEOUT_S} s")
        if check.returncode != 0:
            candidate.unlink(missing_ok=True)
            reason = (check.stdout.strip() or check.stderr.strip().splitlines()[-1:] or ["no reason given"])[-1]
            return self._failed(self._reason(reason))
        os.replace(candidate, self.snapshot)
        self.counts["success"] += 1
        self._write_counts()
        logger.info("reload: %s validated; the workers switch to it now", self.configured)
        return True

    def _failed(self, reason: str) -> bool:
        self.counts["failure"] += 1
        self._write_counts()
        logger.error("reload refused, still serving the previous model: checkpoint %s: %s", self.configured, reason)
        return False

    def _write_counts(self) -> None:
        partial = self.directory / "reloads.json.tmp"
        partial.write_text(json.dumps(self.counts))
        os.replace(partial, self.directory / "reloads.json")

    def remove(self) -> None:
        for path in self.directory.iterdir():
            path.unlink(missing_ok=True)
        self.directory.rmdir()


class ModelCollector(Collector):
    """`fashion_serve_model_info` (the model this worker serves now: one series, value 1) and
    `fashion_serve_model_reloads_total{result}` (the supervisor's counts), read at each scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "fashion_serve_model_info", "The model being served (value 1)", labels=("name", "arch", "sha256", "device")
        )
        service = self.runtime.service
        if service is not None:
            info.add_metric([service.name, service.loaded.arch, service.checkpoint.sha256, str(service.device)], 1)
        yield info
        reloads = CounterMetricFamily(
            "fashion_serve_model_reloads", "Model reloads asked for with SIGHUP, by result", labels=("result",)
        )
        for result, count in reload_counts(snapshot_path()).items():
            reloads.add_metric([result], count)
        yield reloads
