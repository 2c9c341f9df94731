"""The access log's cost: /predict at c=32 with the access log off (warnings only), then on (one
line per request, text or `--format json`, written to a file as a log collector would read it).

    python -m bench.access_log [--seconds 8] [--rounds 2] [--checkpoint models/course_network.pt]

Off and on alternate for `--rounds`, in one run, each round starting with the other one; the
ratios are what to read (server CPU per request is the steadier one on a shared machine). Every
request answered while the log was on must have its line in the file: the count is checked after
each server stops (the lines a worker holds are written when it exits).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.run import ROOT, drive, fashion_pngs, rotated, started, write_bodies


def _answered(port: int) -> float:
    """The /predict requests the server has answered 200 (its metrics, summed over the workers)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
    return sum(
        sample.value
        for family in families
        if family.name == "fashion_serve_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("route") == "/predict"
        and sample.labels.get("status") == "200"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.access_log", description=__doc__)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "course_network.pt")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    rows: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        content_type = write_bodies(Path(tmp), fashion_pngs(256), 1)
        for round_ in range(args.rounds):
            for mode, level in rotated([("off", "warning"), ("on", "info")], round_):
                log = Path(tmp) / f"{mode}.log"
                log.unlink(missing_ok=True)
                env = {"FASHION_SERVE_LOG_LEVEL": level, "FASHION_SERVE_LOG_FORMAT": args.format}
                with started("service", args.checkpoint, args.workers, extra_env=env, log=log) as server:
                    row = drive(server, Path(tmp), content_type, 32, args.seconds, 2)
                    answered = _answered(server.port)
                lines = sum("POST /predict 200" in line for line in log.open())
                rows[mode].append(row["rps"])
                cpu[mode].append(row["cpu_ms"])
                print(
                    f"access log {mode:<3} c=32 {row['rps']:8.0f} req/s  p99 {row['p99']:6.2f} ms  "
                    f"server CPU {1000 * row['cpu_ms']:5.0f} us/request  "
                    f"{answered:.0f} answered, {lines} lines in the file",
                    flush=True,
                )
                if mode == "on" and lines != answered:
                    print(f"  LINES LOST: the server answered {answered:.0f} /predict requests, the file has {lines}")
    off, on = statistics.median(rows["off"]), statistics.median(rows["on"])
    cpu_off, cpu_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    print(
        f"access log on / off: {on / off:.3f}x req/s, {cpu_on / cpu_off:.3f}x server CPU per request "
        f"(medians of {args.rounds})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
