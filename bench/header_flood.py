"""Memory of a worker while many connections send huge request heads, on 127.0.0.1.

`python -m bench.header_flood [--root OTHER_CHECKOUT]` starts `python -m app` (one worker) from
this checkout, or from another one to compare, opens `--connections` sockets that each send
a request head of `--head-mb` MB in 64 KiB writes, and reports the worker's peak RSS growth
and how the heads were answered. Stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

from bench.server import ROOT, serving

CHUNK = 64 * 1024


def _rss_mb(pid: int) -> float:
    """The resident memory of the server and its workers."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children()]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total / 2**20


def _flood(port: int, head_bytes: int, outcomes: Counter[str], lock: threading.Lock) -> None:
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Flood: "
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            sent = 0
            try:
                s.sendall(head)
                while sent < head_bytes:
                    s.sendall(b"a" * CHUNK)
                    sent += CHUNK
                s.sendall(b"\r\n\r\n")
            except OSError:
                pass
            try:
                answer = s.recv(64).split(b"\r\n")[0].decode(errors="replace") or "closed"
            except OSError as exc:
                answer = type(exc).__name__
    except OSError as exc:
        answer = f"connect: {type(exc).__name__}"
    with lock:
        outcomes[answer] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.header_flood", description=__doc__)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout to serve from (compare before/after)")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--head-mb", type=float, default=8.0)
    args = parser.parse_args(argv)
    env = {"FASHION_SERVE_LOG_LEVEL": "warning"}
    with serving(env, workers=1, root=args.root, capture=False) as (server, port):
        before = _rss_mb(server.pid)
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()
        peak, started = before, time.perf_counter()
        threads = [
            threading.Thread(target=_flood, args=(port, int(args.head_mb * 2**20), outcomes, lock), daemon=True)
            for _ in range(args.connections)
        ]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads) and time.perf_counter() - started < 120:
            peak = max(peak, _rss_mb(server.pid))
            time.sleep(0.05)
        ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=10).status
        print(
            f"{args.root}: {args.connections} connections x {args.head_mb:g} MB heads: "
            f"RSS {before:.0f} MB -> peak {peak:.0f} MB (+{peak - before:.0f} MB); "
            f"answers {dict(outcomes)}; ready afterwards: {ready}; {time.perf_counter() - started:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
