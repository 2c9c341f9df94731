"""Logs that carry the request id: one handler, text or JSON, for our loggers, uvicorn's and gunicorn's."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class _BufferedStderrHandler(logging.Handler):
    """Formats each record at once and writes them to `sys.stderr` (whatever it is at the time: test
    capture swaps it) together: one write per `FLUSH_LINES` lines or per `FLUSH_S`, whichever
    comes first. A write per access line costs the event loop a system call per request, and with
    it the GIL, which the inference thread then holds for a while. A record at WARNING or above is
    written at once, with the lines before it; what is held is written by a timer thread, before a
    fork (so no child inherits it) and at exit (`logging.shutdown`). A worker stops holding lines
    once it begins to stop (`stop_holding_logs`): uvicorn ends it with the signal that stopped it,
    re-raised, which runs no exit handler."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = True
        self._lines: list[str] = []
        self._timer_pid = 0  # the process whose timer thread runs (threads do not survive a fork)
        os.register_at_fork(before=self.flush, after_in_child=self._lines.clear)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
            if not self.holding or record.levelno >= logging.WARNING or len(self._lines) >= FLUSH_LINES:
                self.flush()
            elif self._timer_pid != os.getpid():
                self._timer_pid = os.getpid()
                threading.Thread(target=self._flush_every, args=(FLUSH_S,), name="log-flush", daemon=True).start()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write the lines held. If the write fails (stderr closed at exit; or a signal handler
        logging while the main thread was mid-write: a re-entrant call), the lines stay held for
        the next flush; never raised into the caller. The lines are taken out before the write:
        a flush that interrupts another (a signal handler's, on the same thread: the lock is
        re-entrant) writes only the lines that came after, never the same line twice."""
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock made it
            if not self._lines:
                return
            taken = self._lines[:]
            self._lines.clear()  # the same list: a fork in the child clears it (`__init__`)
            try:
                sys.stderr.write("\n".join(taken) + "\n")
                sys.stderr.flush()
            except Exception:
                self._lines[:0] = taken

    def _flush_every(self, seconds: float) -> None:
        while True:
            time.sleep(seconds)
            self.flush()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Log lines are written together: at most this many held, for at most this long.
FLUSH_LINES = 256
FLUSH_S = 0.5
_handler: _BufferedStderrHandler | None = None
_configured: tuple[str, str] | None = None  # the (format, level) this process's loggers have


def configure_logging(log_format: str, level: str) -> None:
    """Route our loggers and uvicorn's and gunicorn's through one handler (one per process, kept
    across forks) with the request id on every line. Once per process: `python -m app` configures
    before it forks, and a worker's lifespan then finds it done; called again with another format
    or level (tests), it reconfigures."""
    global _handler, _configured
    if _configured == (log_format, level) and _handler is not None:
        _handler.holding = True  # a new app in this process (tests) holds lines again
        return
    _configured = (log_format, level)
    handler = _handler = _handler or _BufferedStderrHandler()
    handler.holding = True
    handler.filters.clear()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.captureWarnings(True)  # e.g. Pillow's "Corrupt EXIF data" on a bad upload
    for name in ("app", "models", "uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(level.upper())
    # The request middleware logs each request with its id; uvicorn's access log would repeat it.
    logging.getLogger("uvicorn.access").disabled = True
    # The parser warns about every malformed body; the 400 it turns into is logged already.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


def use_service_handler(logger: logging.Logger) -> None:
    """Send `logger` (gunicorn's error log, which gunicorn sets up itself) through the configured handler."""
    if _handler is not None:
        logger.handlers = [_handler]
        logger.propagate = False


def flush_logs() -> None:
    """Write the lines held so far (tests that read the log)."""
    if _handler is not None:
        _handler.flush()


def stop_holding_logs() -> None:
    """Write the lines held so far, and every line at once from now on (a worker on its way out)."""
    if _handler is not None:
        _handler.holding = False
        _handler.flush()
