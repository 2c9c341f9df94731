"""The tail with Triton's own client: v2 REST, one image per request, `--clients` tritonclient.http
clients (threads) in each of `--processes` processes on this machine, against `python -m app` with
its default worker count (`app.__main__.usable_cpus`) and then with each other `--workers` given;
p50, p99 and their ratio.

    python -m bench.tail [--seconds 10] [--processes 8] [--clients 4] [--workers 1 2] [--rounds 1]

The clients share the server's cores, as they would beside a sidecar or under a CPU quota: the
question is whether the tail stays near the median (p99 <= 3x p50) when they do.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import numpy as np

from app.__main__ import usable_cpus
from bench.run import ROOT, started

MODEL = "course_network"


def _client_process(port: int, clients: int, seconds: float, warmup: float, images: np.ndarray, out: object) -> None:
    """`clients` threads, each its own tritonclient.http client, one request in flight each; the
    latencies of the answers after `warmup`, and the failures, put on `out`."""
    import tritonclient.http as httpclient

    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    began = time.perf_counter()

    def run(i: int) -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = httpclient.InferInput("input", [1, 1, 28, 28], "FP32")
        n = 0
        while (now := time.perf_counter()) - began < warmup + seconds:
            tensor.set_data_from_numpy(images[(i + n) % len(images)][np.newaxis], binary_data=True)
            n += 1
            try:
                client.infer(MODEL, [tensor])
            except Exception:
                with lock:
                    failures[0] += 1
                continue
            if now - began >= warmup:
                with lock:
                    latencies.append(time.perf_counter() - now)
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((latencies, failures[0]))  # type: ignore[attr-defined]


def measure(workers: int, args: argparse.Namespace, images: np.ndarray) -> dict[str, float]:
    """One server with `workers` workers, the client processes against it."""
    with started("service", ROOT / "models" / f"{MODEL}.pt", workers) as server:
        queue: multiprocessing.Queue = multiprocessing.Queue()
        processes = [
            multiprocessing.Process(
                target=_client_process, args=(server.port, args.clients, args.seconds, args.warmup, images, queue)
            )
            for _ in range(args.processes)
        ]
        for process in processes:
            process.start()
        results = [queue.get(timeout=args.warmup + args.seconds + 60) for _ in processes]
        for process in processes:
            process.join()
    latencies = sorted(x for lat, _ in results for x in lat)
    if not latencies:
        raise SystemExit(f"no request answered in {args.seconds:g} s ({sum(f for _, f in results)} failures)")
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    return {
        "rps": len(latencies) / args.seconds,
        "p50": 1000 * p50,
        "p99": 1000 * p99,
        "failures": sum(f for _, f in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4, help="tritonclient.http clients per process")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="worker counts besides the default")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    from models import load_checkpoint
    from models.preprocessing import normalize
    from training.data import load_fashion_mnist

    preprocess = load_checkpoint(ROOT / "models" / f"{MODEL}.pt").preprocess
    images = normalize(load_fashion_mnist().test.images[:256].numpy(), preprocess)[:, np.newaxis].astype(np.float32)
    clients = args.processes * args.clients
    print(f"v2 REST, 1 image, {clients} tritonclient.http clients in {args.processes} processes, {args.seconds:g} s")
    ratios: dict[str, list[float]] = {}
    default = usable_cpus()  # what `python -m app` starts with no --workers or FASHION_SERVE_WORKERS
    for _ in range(args.rounds):
        for workers in [default, *(w for w in args.workers if w != default)]:
            row = measure(workers, args, images)
            label = f"{workers} worker{'s' * (workers > 1)}" + (" (default)" if workers == default else "")
            ratios.setdefault(label, []).append(row["p99"] / row["p50"])
            print(
                f"  {label:<20} {row['rps']:8.0f} req/s  p50 {row['p50']:6.2f} ms  p99 {row['p99']:6.2f} ms  "
                f"p99/p50 {row['p99'] / row['p50']:5.2f}  failures {row['failures']:.0f}",
                flush=True,
            )
    if args.rounds > 1:
        for label, values in ratios.items():
            print(f"  {label:<20} p99/p50 median of {args.rounds}: {statistics.median(values):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
