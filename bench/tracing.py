"""Tracing's cost: /predict at c=32 with tracing off, then on (every request sampled, or `--ratio`
of them, exported over OTLP/HTTP to a receiver in this process that reads and discards each export).

    python -m bench.tracing [--seconds 8] [--rounds 2] [--checkpoint models/course_network.pt]

Off and on alternate for `--rounds`, in one run, each round starting one setting further on (off
first, then on first, ...); the ratios are what to read, the median of the rounds' own ratios
first. `--control` adds a third server to each round, tracing on with nothing sampled (no span
made, nothing exported; a few microseconds of deciding per request): how far its ratio to off
strays is how far the machine's noise moves a figure, a band within which the traced ratio says
nothing.
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.run import ROOT, drive, fashion_pngs, rotated, started, write_bodies


class _Sink(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and drops them."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "course_network.pt")
    parser.add_argument("--ratio", type=float, default=1.0, help="share of requests sampled (1: every request)")
    parser.add_argument("--control", action="store_true", help="also run tracing on with nothing sampled, each round")
    args = parser.parse_args(argv)
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    traced = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
        "OTEL_TRACES_SAMPLER": "always_on" if args.ratio >= 1 else "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(args.ratio),
    }
    modes = {"off": {}, "on": traced}
    if args.control:
        modes["control"] = {**traced, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    rows: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}  # the server's CPU ms per request
    with tempfile.TemporaryDirectory() as tmp:
        content_type = write_bodies(Path(tmp), fashion_pngs(256), 1)
        for round_ in range(args.rounds):
            for mode, env in rotated(list(modes.items()), round_):
                with started("service", args.checkpoint, args.workers, extra_env=env) as server:
                    row = drive(server, Path(tmp), content_type, 32, args.seconds, 2)
                rows[mode].append(row["rps"])
                cpu[mode].append(row["cpu_ms"])
                latency = f"p50 {row['p50']:6.2f} ms  p99 {row['p99']:6.2f} ms"
                used = f"server CPU {1000 * row['cpu_ms']:6.1f} us/request"
                print(f"tracing {mode:<7} c=32 {row['rps']:8.0f} req/s  {latency}  {used}", flush=True)
    sink.shutdown()
    off, on = sum(rows["off"]) / len(rows["off"]), sum(rows["on"]) / len(rows["on"])
    print(f"tracing on / off = {on / off:.3f}x req/s (mean of {args.rounds} rounds each)")
    for mode in list(modes)[1:]:  # each against off
        _compare(mode, rows, cpu)
    return 0


def _compare(mode: str, rows: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    """Print `mode` against off: per-round req/s ratios and the server's CPU per request."""
    # Each round's servers ran back to back, so its ratio is the least disturbed by the machine's
    # slower and faster phases; their median is the figure to compare runs by.
    pairs = sorted(o / f for o, f in zip(rows[mode], rows["off"], strict=True))
    spread = ", ".join(f"{p:.3f}" for p in pairs)
    print(f"per round {mode} / off: median {statistics.median(pairs):.3f}x ({spread})")
    # The server's CPU per request moves less with this machine's load than req/s does: tracing's
    # cost in microseconds, and the throughput it would allow where the server's CPU is the limit.
    off_cpu, on_cpu = statistics.median(cpu["off"]), statistics.median(cpu[mode])
    added = 1000 * (on_cpu - off_cpu)
    print(f"server CPU per request: off {1000 * off_cpu:.1f} us, {mode} {1000 * on_cpu:.1f} us "
          f"({added:+.1f} us; off / {mode} = {off_cpu / on_cpu:.3f}x)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
