"""The supervisor's half of a reload: the snapshot the workers serve, replaced only by a
checkpoint that a separate process validated (see `app.reload`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.reload.snapshot import COUNTS_FILE, VALID
from models.checkpoint import MAX_FILE_BYTES, CheckpointError, load_checkpoint

logger = logging.getLogger("app")

VALIDATE_TIMEOUT_S = 300


class CheckpointSource:
    """The supervisor's side: the configured path, the snapshot the workers load, the counts."""

    def __init__(self, configured: Path, directory: Path, device: str) -> None:
        self.configured = configured
        self.directory = directory
        self.device = device
        self.snapshot = directory / "current.pt"
        self.counts = {"success": 0, "failure": 0}
        self.last: dict[str, object] | None = None  # the last reload's result, time and reason
        self._validation: tuple[subprocess.Popen[bytes], float] | None = None
        self._again = False  # a SIGHUP came during the validation: reload once more after it

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
        try:
            with self.configured.open("rb") as source:
                data = source.read(MAX_FILE_BYTES + 1)  # load_checkpoint refuses the oversized copy
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.configured}: {exc.strerror or exc}") from None
        try:
            candidate.write_bytes(data)
        except OSError as exc:
            candidate.unlink(missing_ok=True)
            raise CheckpointError(f"cannot copy it to {self.directory}: {exc.strerror or exc}") from None
        return candidate

    def install(self) -> None:
        """Start-up: copy the configured file and check the copy as the workers will load it
        (raises CheckpointError, saying the configured path)."""
        candidate = self._copy()
        try:
            load_checkpoint(candidate, device="cpu")
        except CheckpointError as exc:
            candidate.unlink(missing_ok=True)
            raise CheckpointError(self._reason(str(exc))) from None
        os.replace(candidate, self.snapshot)
        self._write_counts()

    def _reason(self, message: str) -> str:
        """A message about the private copy, told about the configured path."""
        return message.replace(str(self.directory / "candidate.pt"), str(self.configured))

    def start_reload(self) -> None:
        """SIGHUP: copy the configured file and start validating the copy in a separate process;
        `poll` (from the supervisor's loop) finishes the reload. Never raises: a reload that
        cannot even start is a failure like any other."""
        if self._validation is not None:
            # Operators send one signal per change: remembered, never dropped. Several signals
            # during one validation make one more reload, of the file as it is when it starts.
            self._again = True
            logger.info("reload: a reload is being validated; the file is read again once it ends")
            return
        try:
            candidate = self._copy()
            verdict = (self.directory / "verdict.txt").open("w")
            with verdict:
                process = subprocess.Popen(
                    [sys.executable, "-m", "app.reload.validate", str(candidate)],
                    stdout=verdict,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "FASHION_SERVE_DEVICE": self.device},
                )
            self._validation = (process, time.monotonic())
        except CheckpointError as exc:
            self._failed(str(exc))
        except Exception as exc:
            self._failed(f"cannot start the validation: {exc!r}")

    def poll(self) -> None:
        """Finish a reload whose validation has ended (the new snapshot, or a refusal), then
        start the reload a SIGHUP asked for meanwhile."""
        if self._validation is None:
            return
        process, started = self._validation
        if process.poll() is None and time.monotonic() - started <= VALIDATE_TIMEOUT_S:
            return
        self._finish(process, started)
        if self._again:
            self._again = False
            self.start_reload()

    def _finish(self, process: subprocess.Popen[bytes], started: float) -> None:
        timed_out = time.monotonic() - started > VALIDATE_TIMEOUT_S
        # The verdict is what the validation wrote, not its exit status: gunicorn's loop reaps
        # every child it sees end (os.waitpid(-1)), and a reaped status reads as 0.
        if process.poll() is None and not timed_out:
            return
        self._validation = None
        candidate = self.directory / "candidate.pt"
        try:
            if timed_out:
                process.kill()
                raise CheckpointError(f"validation took over {VALIDATE_TIMEOUT_S} s")
            lines = (self.directory / "verdict.txt").read_text(errors="replace").strip().splitlines()
            if lines[-1:] != [VALID]:
                raise CheckpointError(self._reason(lines[-1] if lines else "the validation ended without a verdict"))
            os.replace(candidate, self.snapshot)
        except CheckpointError as exc:
            candidate.unlink(missing_ok=True)
            self._failed(str(exc))
            return
        except OSError as exc:
            candidate.unlink(missing_ok=True)
            self._failed(f"cannot install the new copy: {exc.strerror or exc}")
            return
        self._record("success")
        logger.info("reload: %s validated; the workers switch to it now", self.configured)

    def _failed(self, reason: str) -> None:
        self._record("failure", reason)
        logger.error("reload refused, still serving the previous model: checkpoint %s: %s", self.configured, reason)

    def _record(self, result: str, reason: str | None = None) -> None:
        self.counts[result] += 1
        self.last = {"result": result, "finished_at": time.time(), "reason": reason}
        self._write_counts()

    def _write_counts(self) -> None:
        partial = self.directory / f"{COUNTS_FILE}.tmp"
        try:
            partial.write_text(json.dumps({**self.counts, "last": self.last}))
            os.replace(partial, self.directory / COUNTS_FILE)
        except OSError as exc:  # the counts are for /metrics; never a reason to stop serving
            logger.warning("reload: cannot record the reload counts: %s", exc.strerror or exc)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
