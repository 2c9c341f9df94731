"""The supervisor's half of a reload: the snapshot the workers serve, replaced only by a
checkpoint that a separate process validated (see `app.reload`).

The validating process is forked from the supervisor, which has imported the application
(gunicorn's `preload_app`) but never runs the model: the child starts with torch and the
app already imported, so a broken file is refused and a good one validated in well under the
time a new interpreter takes to import torch (docs/performance.md has the figures). It loads
and warms up the checkpoint as a worker would, writes its verdict, and exits; the supervisor
itself still runs nothing of the model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
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
        self._validation: Validation | None = None
        self._again = False  # a SIGHUP came during the validation: reload once more after it
        self._took_s: float | None = None  # how long the validation that just ended took

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
            self._validation = Validation.fork(candidate, self.directory / "verdict.txt", self.device)
        except CheckpointError as exc:
            self._failed(str(exc))
        except Exception as exc:
            self._failed(f"cannot start the validation: {exc!r}")

    def poll(self) -> None:
        """Finish a reload whose validation has ended (the new snapshot, or a refusal), then
        start the reload a SIGHUP asked for meanwhile."""
        validation = self._validation
        if validation is None or not (validation.ended() or validation.seconds() > VALIDATE_TIMEOUT_S):
            return
        self._finish(validation)
        if self._again:
            self._again = False
            self.start_reload()

    def _finish(self, validation: Validation) -> None:
        # The verdict is what the validation wrote, not its exit status: gunicorn's loop reaps
        # every child it sees end (os.waitpid(-1)), and a reaped status is lost.
        self._validation = None
        self._took_s = validation.seconds()
        candidate = self.directory / "candidate.pt"
        try:
            if not validation.ended():
                validation.kill()
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
        took = self._took_s
        self.last = {"result": result, "finished_at": time.time(), "validation_s": took, "reason": reason}
        self._took_s = None
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


class Validation:
    """A validating process forked from the supervisor: `app.reload.validate` on a candidate."""

    def __init__(self, pid: int, verdict: Path) -> None:
        self.pid = pid
        self.verdict = verdict
        self.started = time.monotonic()
        self._ended = False

    @classmethod
    def fork(cls, candidate: Path, verdict: Path, device: str) -> Validation:
        verdict.unlink(missing_ok=True)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _validate_and_exit(candidate, verdict, device)
        return cls(pid, verdict)

    def ended(self) -> bool:
        if not self._ended:
            try:
                self._ended = os.waitpid(self.pid, os.WNOHANG)[0] == self.pid
            except ChildProcessError:  # gunicorn's loop reaped it first
                self._ended = True
        return self._ended

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _validate_and_exit(candidate: Path, verdict: Path, device: str) -> None:
    """In the forked child: default signal handling (not gunicorn's), the verdict to a file, exit."""
    code = 1
    try:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        out = os.open(verdict, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdout = sys.stderr = open(out, "w", buffering=1, closefd=False)  # noqa: SIM115 (exits below)
        os.environ["FASHION_SERVE_DEVICE"] = device
        from app.reload.validate import main

        code = main([str(candidate)])
        sys.stdout.flush()
    except BaseException as exc:
        os.write(2, f"validation failed: {exc!r}\n".encode())
    finally:
        os._exit(code)
