"""Load through a load balancer on this machine: POST real Fashion-MNIST uploads to
http://127.0.0.1:PORT/predict for a fixed time with wrk (one thread, so the load generator leaves the
CPU to the servers), then print one JSON line: requests, requests/s, socket errors, non-2xx
answers, latency percentiles. scripts/container-check drives nginx in front of the replicas with it.

    python -m bench.lb --port 18002 --seconds 8 --connections 16
    python -m bench.lb --port 18002 --seconds 20 --connections 16 --every-request

With --every-request the load comes from Python clients instead (keep-alive connections, one
request at a time each) that stop only after their request in flight is answered, so every
request is accounted for: what a chaos test needs. wrk cuts its last requests off when its time
is up, and a cut request can read as a socket error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import LUA, fashion_pngs, write_bodies


def run(port: int, seconds: int, connections: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        content_type = write_bodies(Path(tmp), fashion_pngs(256), 1)
        env = {
            **os.environ,
            "BENCH_BODIES": tmp,
            "BENCH_COUNT": (Path(tmp) / "count").read_text(),
            "BENCH_CONTENT_TYPE": content_type,
        }
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(LUA), "--timeout", "10s"]
        out = subprocess.run(
            [*command, f"http://127.0.0.1:{port}/predict?k=3"], env=env, capture_output=True, text=True, check=True
        )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    duration = summary["duration_us"] / 1e6
    return {
        "requests": summary["requests"],
        "rps": round(summary["requests"] / duration, 1),
        "errors": summary["errors"],
        "non_2xx": summary["non_2xx"],
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "max_ms": summary["max_us"] / 1000,
    }


def every_request(port: int, seconds: float, connections: int) -> dict[str, object]:
    """`connections` clients for `seconds`; each answer's status, each connection error, counted."""
    import time

    from bench.clients import KeepAliveLoad

    boundary = "lbboundary"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    uploads = [
        (
            "POST",
            "/predict?k=3",
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n\r\n'.encode()
            + png
            + f"\r\n--{boundary}--\r\n".encode(),
            headers,
        )
        for i, png in enumerate(fashion_pngs(64))
    ]
    load = KeepAliveLoad(port, connections, lambda i: uploads[i:] + uploads[:i]).start()
    time.sleep(seconds)
    load.stop()
    latencies = sorted(load.latencies)
    total = sum(load.outcomes.values())
    return {
        "requests": total,
        "rps": round(total / seconds, 1),
        "errors": sum(n for outcome, n in load.outcomes.items() if not outcome.isdigit()),
        "non_2xx": sum(n for outcome, n in load.outcomes.items() if outcome.isdigit() and not outcome.startswith("2")),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "max_ms": round(latencies[-1] * 1000, 3),
        "outcomes": dict(load.outcomes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lb", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--every-request", action="store_true", help="Python clients: every request accounted for")
    args = parser.parse_args(argv)
    result = (every_request if args.every_request else run)(args.port, args.seconds, args.connections)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
