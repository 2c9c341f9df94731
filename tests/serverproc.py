"""Start `python -m app` as a real process on a free loopback port, for tests and scripts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(env: dict[str, str] | None = None, *args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=ROOT,
        env={**os.environ, "FASHION_SERVE_DEVICE": "cpu", "FASHION_SERVE_WORKERS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, port


def wait_ready(process: subprocess.Popen[str], port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}: {process.stdout.read() if process.stdout else ''}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError("server not ready in time")


@contextmanager
def serving(env: dict[str, str] | None = None, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A ready `python -m app`; stopped with SIGTERM (killed if it hangs) when the block ends, its
    output then kept in `process.output` (stdout is a pipe: under load, log at warning)."""
    process, port = start_server(env, *args)
    try:
        wait_ready(process, port)
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        process.output = output  # type: ignore[attr-defined]
