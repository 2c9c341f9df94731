"""A bounded soak on loopback: /predict at c=64 for a few minutes; report 5xx and RSS growth.

    scripts/soak [--seconds 180] [--connections 64]

Fails (exit 1) on any non-2xx answer or RSS growth of 5 % or more after warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.run import drive, fashion_pngs, started, write_bodies
from bench.server import ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "fashion_cnn.pt")
    args = parser.parse_args(argv)

    with started("service", args.checkpoint, args.workers) as server, tempfile.TemporaryDirectory() as tmp:
        content_type = write_bodies(Path(tmp), fashion_pngs(256), 1)
        drive(server, Path(tmp), content_type, args.connections, 15, 2)  # warm-up: allocator settles
        rss_before = server.rss_mb_per_worker()
        row = drive(server, Path(tmp), content_type, args.connections, args.seconds, 1)
        rss_after = server.rss_mb_per_worker()
    growth = 100 * (rss_after - rss_before) / rss_before
    print(
        f"soak: {args.seconds:g} s at c={args.connections}, {args.workers} workers, {args.checkpoint.name}: "
        f"{row['rps']:.0f} req/s, p99 {row['p99']:.1f} ms, errors (non-2xx or socket) {row['errors']}, "
        f"RSS per worker {rss_before:.1f} -> {rss_after:.1f} MB ({growth:+.2f} %)"
    )
    ok = row["errors"] == 0 and growth < 5.0
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
