"""Overload: the service under a burst of closed-loop clients, with /health/live probed throughout.

    python -m bench.overload [--seconds 15] [--burst 1024] [--deadline-clients 4096]

Rows, each on the default CNN with one image per request (wrk, one thread, every client sending
again as soon as it is answered): the peak at c=32; the burst at c=`--burst` (wrk waits up to 10 s
for an answer); the peak again right after; then, with `FASHION_SERVE_REQUEST_TIMEOUT_S=0.5`,
`--deadline-clients` clients that each give up after 1 s, and the peak again. Printed per row:
answers/s, goodput (200s/s and as a share of the first peak), refusals (503), deadline answers
(504), clients that gave up (timeouts), p50/p99 of all answers, and the probes' p99, max and how
many took over 250 ms. docs/performance.md holds a run of it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.run import ROOT, LivenessProbe, Server, drive, fashion_pngs, started, write_bodies

HEADER = (
    f"{'load':<22} {'answers/s':>9} {'200/s':>7} {'of peak':>7} {'503':>7} {'504':>6} {'gave up':>7} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'probe p99':>9} {'max':>6} {'>250ms':>6}"
)


@dataclass
class Load:
    """The service under test and the bodies its clients send."""

    server: Server
    bodies: Path
    content_type: str
    seconds: int
    peak: float | None = None  # goodput of the first row, once measured

    def row(self, label: str, clients: int, timeout: str = "10s") -> float:
        """Drive `clients` with /health/live probed, print the row, return its goodput (200s/s)."""
        probe = LivenessProbe(self.server.port)
        probe.start()
        try:
            result = drive(
                self.server, self.bodies, self.content_type, clients, self.seconds, 1, timeout=timeout, statuses=True
            )
        finally:
            probe.stopping.set()
            probe.join()
        goodput = _print_row(label, result["summary"], probe, self.peak)
        self.peak = self.peak or goodput
        return goodput


def _print_row(label: str, summary: dict, probe: LivenessProbe, peak: float | None) -> float:
    seconds = summary["duration_us"] / 1e6
    statuses = {int(k): v for k, v in summary["statuses"].items()}
    goodput = statuses.get(200, 0) / seconds
    share = f"{100 * goodput / peak:6.0f}%" if peak else f"{'-':>7}"
    probes = probe.latencies or [float("nan")]
    slow = sum(latency > 0.25 for latency in probe.latencies) + probe.failures
    print(
        f"{label:<22} {summary['requests'] / seconds:9.0f} {goodput:7.0f} {share} {statuses.get(503, 0):7d} "
        f"{statuses.get(504, 0):6d} {summary['timeouts']:7d} {summary['p50_us'] / 1000:7.1f} "
        f"{summary['p99_us'] / 1000:7.1f} {probe.p99_ms():9.1f} {1000 * max(probes):6.0f} {slow:6d}",
        flush=True,
    )
    return goodput


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="measured time per row")
    parser.add_argument("--burst", type=int, default=1024, help="closed-loop clients in the burst")
    parser.add_argument("--deadline-clients", type=int, default=4096, help="clients that give up after 1 s")
    parser.add_argument("--workers", type=int, default=2, help="service workers")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "fashion_cnn.pt")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # wrk inherits it: one socket per client
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp)
        content_type = write_bodies(bodies, fashion_pngs(256), 1)
        with started("service", args.checkpoint, args.workers) as server:
            load = Load(server, bodies, content_type, args.seconds)
            load.row("c=32 (peak)", 32)
            load.row(f"c={args.burst}", args.burst)
            load.row("c=32 after", 32)
        deadline = {"FASHION_SERVE_REQUEST_TIMEOUT_S": "0.5"}
        with started("service", args.checkpoint, args.workers, extra_env=deadline) as server:
            load = Load(server, bodies, content_type, args.seconds, load.peak)
            load.row(f"c={args.deadline_clients}, gives up 1 s", args.deadline_clients, timeout="1s")
            load.row("c=32 after", 32, timeout="1s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
