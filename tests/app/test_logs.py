"""The log handler writes lines together (one write per batch of lines or per half second) and
loses none: a warning writes at once with the lines before it, the timer writes what is held, a
fork neither duplicates nor drops lines, and the worker's way out writes the rest."""

from __future__ import annotations

import io
import logging
import os
import sys
import time

import pytest

from app import logs
from app.logs import configure_logging, flush_logs, stop_holding_logs


class _CountingStream(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _capture(monkeypatch: pytest.MonkeyPatch) -> _CountingStream:
    """The handler's stream from now on (set in the test itself: pytest sets its own for each phase)."""
    configure_logging("text", "info")
    flush_logs()
    counting = _CountingStream()
    monkeypatch.setattr(sys, "stderr", counting)
    return counting


def test_lines_are_written_together_and_a_warning_at_once_after_them(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _capture(monkeypatch)
    access = logging.getLogger("app.access")
    for i in range(3):
        access.info("GET /line/%d 200", i)
    assert stream.getvalue() == "", "held, not written one by one"
    logging.getLogger("app").warning("something to see now")
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 4)[-1] for line in lines] == [
        "[-] GET /line/0 200",
        "[-] GET /line/1 200",
        "[-] GET /line/2 200",
        "[-] something to see now",
    ]
    assert stream.writes == 1


def test_a_full_batch_is_written_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _capture(monkeypatch)
    access = logging.getLogger("app.access")
    total = logs.FLUSH_LINES * 2 + 1
    for i in range(total):
        access.info("GET /line/%d 200", i)
    written = len(stream.getvalue().splitlines())
    # The half-second flusher may also write once while the loop runs (a loaded CI machine did):
    # whichever way, fewer than one batch is ever held back.
    assert total - logs.FLUSH_LINES < written < total, written
    assert stream.writes in (2, 3)
    flush_logs()
    assert len(stream.getvalue().splitlines()) == logs.FLUSH_LINES * 2 + 1


def test_the_timer_writes_what_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _capture(monkeypatch)
    logging.getLogger("app.access").info("GET /alone 200")
    deadline = time.monotonic() + 10 * logs.FLUSH_S
    while "GET /alone 200" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "GET /alone 200" in stream.getvalue()


def test_a_fork_neither_repeats_nor_drops_the_lines_held(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _capture(monkeypatch)
    read, write = os.pipe()
    logging.getLogger("app.access").info("GET /before-the-fork 200")
    pid = os.fork()
    if pid == 0:  # the child: its own lines only, to the pipe
        try:
            sys.stderr = os.fdopen(write, "w")
            logging.getLogger("app.access").info("GET /in-the-child 200")
            flush_logs()
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as child:
        child_lines = child.read().splitlines()
    assert [line.rsplit("] ", 1)[1] for line in child_lines] == ["GET /in-the-child 200"]
    assert stream.getvalue().count("GET /before-the-fork 200") == 1, "written by the parent, before it forked"


def test_a_worker_on_its_way_out_writes_every_line_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn ends a worker with the re-raised SIGTERM, which runs no exit handler: nothing may be held."""
    stream = _capture(monkeypatch)
    logging.getLogger("app.access").info("GET /held 200")
    stop_holding_logs()
    assert "GET /held 200" in stream.getvalue()
    logging.getLogger("app.access").info("GET /after 200")
    assert "GET /after 200" in stream.getvalue()
    configure_logging("text", "info")  # a new configuration (a new app in this process) holds again
    logging.getLogger("app.access").info("GET /held-again 200")
    assert "GET /held-again 200" not in stream.getvalue()
    flush_logs()


def test_a_failed_write_keeps_the_lines_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal handler that logs while the main thread is mid-write gets a re-entrant call error
    from the stream: the lines wait for the next write, and the handler goes on."""
    stream = _capture(monkeypatch)
    failing = [True]
    write = stream.write

    def flaky(text: str) -> int:
        if failing[0]:
            failing[0] = False
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")
        return write(text)

    monkeypatch.setattr(stream, "write", flaky)
    logging.getLogger("app").warning("first")  # written at once: the write fails, nothing raised
    assert stream.getvalue() == ""
    logging.getLogger("app").warning("second")
    assert [line.rsplit("] ", 1)[1] for line in stream.getvalue().splitlines()] == ["first", "second"]


def test_a_flush_that_interrupts_another_never_writes_a_line_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM handler logs (and flushes) while the main thread's flush is inside the write: the
    handler's lock is re-entrant, so the inner flush runs. Found by a worker's shutdown log, which
    showed one worker's "SIGTERM" line twice: the inner flush wrote the outer one's lines again."""
    stream = _capture(monkeypatch)
    write = stream.write
    interrupted = [False]

    def interrupting(text: str) -> int:
        if not interrupted[0]:
            interrupted[0] = True
            logging.getLogger("app").warning("from the signal handler")  # flushes at once, inside this write
        return write(text)

    monkeypatch.setattr(stream, "write", interrupting)
    logging.getLogger("app.access").info("GET /held 200")
    flush_logs()
    lines = [line.rsplit("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert sorted(lines) == ["GET /held 200", "from the signal handler"], lines
