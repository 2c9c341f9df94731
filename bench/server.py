"""A server as a real process for benchmarks and tests: start `python -m app` (or a benchmark's
reference app) on a loopback port the OS picks, wait until /health/ready answers 200, stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict, Unpack

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# On the CPU, one worker, gRPC off (its fixed default port would collide between servers): `env`
# names a port (free_port()) to serve gRPC.
SERVER_DEFAULTS = {"FASHION_SERVE_DEVICE": "cpu", "FASHION_SERVE_WORKERS": "1", "FASHION_SERVE_GRPC_PORT": "0"}


class ServerExited(RuntimeError):
    """The server process ended before it was ready."""


class StartOptions(TypedDict, total=False):
    """start_server's keyword options, for the functions that pass them on."""

    module: str
    workers: int | None
    root: Path
    capture: bool
    log: Path | None


def free_port() -> int:
    """A loopback port that was free just now: the OS picks it when a socket binds to port 0."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(
    env: dict[str, str] | None = None,
    *args: str,
    module: str = "app",
    workers: int | None = None,
    root: Path = ROOT,
    capture: bool = True,
    log: Path | None = None,
) -> tuple[subprocess.Popen[str], int]:
    """Spawn `python -m <module> --host 127.0.0.1 --port <free> <args>` from `root`, with
    `--workers` when `workers` is given (else one worker, unless `env` sets FASHION_SERVE_WORKERS),
    on the CPU and without gRPC unless `env` says otherwise; `env` adds to this process's environment. With
    `capture`, stdout and stderr share one pipe, read with communicate(): a long run that logs much
    should log at warning. Without, they go to this process's own, or to the file `log` names."""
    port = free_port()
    command = [sys.executable, "-m", module, "--host", HOST, "--port", str(port)]
    command += ["--workers", str(workers)] if workers is not None else []
    with open(log, "a") if log is not None and not capture else contextlib.nullcontext() as file:
        process = subprocess.Popen(
            [*command, *args],
            cwd=root,
            env={**os.environ, **SERVER_DEFAULTS, **(env or {})},
            stdout=subprocess.PIPE if capture else file,
            stderr=subprocess.STDOUT if capture or file is not None else None,
            text=True,
        )
    return process, port


def wait_ready(process: subprocess.Popen[str], port: int, timeout: float = 60.0) -> None:
    """Poll /health/ready until it answers 200; ServerExited, with the server's output when it was
    captured, as soon as the process ends; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else "(its output is above)"
            raise ServerExited(f"server exited with {process.returncode}: {output}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:  # refused while it starts, or an error status until the model is loaded
            pass
        time.sleep(0.02)
    raise TimeoutError(f"server not ready after {timeout:g} s")


def stop_server(process: subprocess.Popen[str], timeout: float = 15.0) -> str:
    """SIGTERM, wait up to `timeout` seconds, then kill; the captured output ("" when not captured)."""
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output or ""


@contextmanager
def serving(
    env: dict[str, str] | None = None, *args: str, **options: Unpack[StartOptions]
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A ready server, as (process, port), stopped with stop_server when the block ends (also when
    it never got ready); its output is then kept in `process.output`."""
    process, port = start_server(env, *args, **options)
    try:
        wait_ready(process, port)
        yield process, port
    finally:
        process.output = stop_server(process)  # type: ignore[attr-defined]
