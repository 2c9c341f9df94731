"""Drive single- and multi-image uploads at the service and two references; print one table.

Everything runs on 127.0.0.1 and stops by itself. Load comes from wrk (Debian's `wrk`),
one thread, so the load generator does not starve the servers on a small machine; its
own CPU use is reported. Server CPU is the server's and its workers' (psutil).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
from PIL import Image

from bench.server import ROOT, free_port, serving
from models.served_form import TORCH_FP32

T = TypeVar("T")

# A benchmark case's identity: server, model, images per request, api, served form.
Key = tuple[str, str, int, str, str]

LUA = Path(__file__).resolve().parent / "multipart.lua"


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    port: int
    ready_s: float
    grpc_port: int = 0  # the service's gRPC port (0: not served)

    def processes(self) -> list[psutil.Process]:
        """The server process and its descendants (its worker processes)."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # the server has exited
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def rss_mb_per_worker(self) -> float:
        sizes = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                sizes.append(process.memory_info().rss / 2**20)
        workers = sizes[1:] if len(sizes) > 1 else sizes  # with workers, the first process only supervises
        return statistics.mean(workers) if workers else 0.0


def rotated(settings: Sequence[T], round_: int) -> list[T]:
    """`settings` in the order round `round_` runs them: each round starts one further on, so that
    a seat's advantage (a machine that speeds up or slows down within a round) does not fall on the
    same setting every round."""
    shift = round_ % len(settings) if settings else 0
    return [*settings[shift:], *settings[:shift]]


@contextmanager
def started(
    name: str,
    checkpoint: Path,
    workers: int,
    served_form: str = "auto",
    extra_env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[Server]:
    """The service (serving the `served_form`, logging warnings only, with `extra_env` on top), or
    a reference app (naive, empty), ready on a loopback port, its output to this process's or to
    the file `log`; stopped at the end."""
    env = {
        "FASHION_SERVE_CHECKPOINT": str(checkpoint),
        "FASHION_SERVE_SERVED_FORM": served_form,
        "FASHION_SERVE_BACKEND": served_form,  # its name before: what a base commit reads
        "FASHION_SERVE_LOG_LEVEL": "warning",
        "BENCH_CHECKPOINT": str(checkpoint),
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    # The references run on the service's own server stack (gunicorn + uvicorn workers,
    # uvloop + httptools, one listening socket per worker), so only the app differs.
    module, args = ("app", ()) if name == "service" else ("bench.references", (name,))
    grpc_port = free_port() if name == "service" else 0
    env["FASHION_SERVE_GRPC_PORT"] = str(grpc_port)
    began = time.perf_counter()
    with serving(env, *args, module=module, workers=workers, capture=False, log=log) as (process, port):
        yield Server(name, process, port, time.perf_counter() - began, grpc_port)


def write_bodies(folder: Path, images: list[bytes], per_request: int) -> str:
    boundary = "benchboundary7MA4YWxkTrZu0gW"
    count = max(1, len(images) // per_request)
    for i in range(count):
        parts = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}_{j}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + images[(i * per_request + j) % len(images)]
            + b"\r\n"
            for j in range(per_request)
        )
        (folder / f"body_{i}.bin").write_bytes(parts + f"--{boundary}--\r\n".encode())
    (folder / "count").write_text(str(count))
    return f"multipart/form-data; boundary={boundary}"


def write_v2_bodies(folder: Path, checkpoint: Path, pngs: list[bytes], per_request: int, datatype: str) -> None:
    """v2 binary-tensor bodies: normalized FP32 [N, 1, 28, 28], or BYTES [N] of the PNG files.
    Each body's JSON header length goes in body_i.len (the Inference-Header-Content-Length)."""
    import struct

    import numpy as np

    from models import load_checkpoint
    from training.data import load_fashion_mnist

    preprocess = load_checkpoint(checkpoint).preprocess
    pixels = load_fashion_mnist().test.images[: len(pngs)].numpy()
    count = max(1, len(pngs) // per_request)
    for i in range(count):
        chosen = [(i * per_request + j) % len(pngs) for j in range(per_request)]
        if datatype == "FP32":
            from models.preprocessing import normalize

            blob = normalize(pixels[chosen], preprocess)[:, np.newaxis].astype("<f4").tobytes()
            shape = [per_request, 1, 28, 28]
        else:
            blob = b"".join(struct.pack("<I", len(pngs[k])) + pngs[k] for k in chosen)
            shape = [per_request]
        tensor = {"name": "input", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(blob)}}
        text = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
        (folder / f"body_{i}.bin").write_bytes(text + blob)
        (folder / f"body_{i}.len").write_text(str(len(text)))
    (folder / "count").write_text(str(count))


def fashion_pngs(limit: int) -> list[bytes]:
    """Real Fashion-MNIST test images, PNG-encoded."""
    import io

    from training.data import load_fashion_mnist

    images = load_fashion_mnist().test.images[:limit].numpy()
    encoded = []
    for array in images:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG")
        encoded.append(buf.getvalue())
    return encoded


class LivenessProbe(threading.Thread):
    """GET /health/live every 5 ms and keep the latencies (about 1,000 per 6 s row)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stopping.is_set():
            start = time.perf_counter()
            try:
                conn.request("GET", "/health/live")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.failures += 1
                self.latencies.append(time.perf_counter() - start)
            except OSError:
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.stopping.wait(0.005)

    def p99_ms(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[98] * 1000 if len(self.latencies) > 2 else float("nan")


def drive(
    server: Server,
    bodies: Path,
    content_type: str,
    connections: int,
    seconds: float,
    warmup: float,
    path: str = "/predict?k=3",
    timeout: str = "10s",
    statuses: bool = False,
) -> dict:
    """wrk at `connections` for `seconds` after `warmup`; `timeout`: when wrk gives up on an answer;
    `statuses`: count the answers by status code (the row's `summary` then has them)."""
    env = {
        **os.environ,
        **({"BENCH_STATUSES": "1"} if statuses else {}),
        "BENCH_BODIES": str(bodies),
        "BENCH_COUNT": (bodies / "count").read_text(),
        "BENCH_CONTENT_TYPE": content_type,
    }
    url = f"http://127.0.0.1:{server.port}{path}"
    base = ["wrk", "-t1", f"-c{connections}", "-s", str(LUA), "--timeout", timeout, url]
    subprocess.run([*base[:3], f"-d{round(warmup)}s", *base[3:]], env=env, capture_output=True, check=True)
    cpu_before = server.cpu_seconds()
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [*base[:3], f"-d{round(seconds)}s", *base[3:]], env=env, capture_output=True, text=True, check=True
    )
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = server.cpu_seconds() - cpu_before
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    duration = summary["duration_us"] / 1e6
    wrk_cpu = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
    return {
        "rps": summary["requests"] / duration,
        "p50": summary["p50_us"] / 1000,
        "p90": summary["p90_us"] / 1000,
        "p99": summary["p99_us"] / 1000,
        "errors": summary["errors"] + summary["non_2xx"],
        "cpu_ms": 1000 * cpu / max(1, summary["requests"]),
        "wrk_cpu": 100 * wrk_cpu / duration,
        "rss": server.rss_mb_per_worker(),
        "summary": summary,
    }


def drive_grpc(
    server: Server,
    bodies: Path,
    model: str,
    per_request: int,
    connections: int,
    seconds: float,
    warmup: float,
    h2load: bool | None = None,
) -> dict:
    """`drive`'s row for ModelInfer over gRPC with the v2 bodies' raw FP32 tensors: h2load where it is
    installed (mean latency in the p50 column, no p90/p99), else bench.grpc_load's Python client
    (`h2load` True or False chooses); the load generator's CPU goes in the `wrk cpu%` column."""
    from bench import grpc_load

    messages = grpc_load.requests_from_v2_bodies(bodies, model, per_request)
    cpu_before = server.cpu_seconds()
    if h2load if h2load is not None else shutil.which("h2load"):  # a C client, as wrk is for the REST rows
        result = grpc_load.load_h2(server.grpc_port, messages[0], connections, seconds, warmup)
    else:
        result = grpc_load.load(server.grpc_port, messages, connections, seconds, warmup)
    cpu = server.cpu_seconds() - cpu_before  # warm-up included: scaled to the measured share below
    return {
        "rps": result["requests"] / seconds,
        "p50": result["p50"],
        "p90": result["p90"],
        "p99": result["p99"],
        "errors": result["errors"],
        "cpu_ms": 1000 * cpu * seconds / (seconds + warmup) / max(1, result["requests"]),
        "wrk_cpu": 100 * result["client_cpu_s"] / (seconds + warmup),
        "rss": server.rss_mb_per_worker(),
    }


@dataclass(frozen=True)
class Case:
    server: str
    model: str
    workers: int
    per_request: int
    concurrency: tuple[int, ...]
    # predict; v2 with binary FP32 or BYTES (encoded PNG) input: v2-fp32, v2-bytes; grpc-fp32: v2 over gRPC, raw FP32
    api: str = "predict"
    served_form: str = "auto"  # FASHION_SERVE_SERVED_FORM: auto serves the checkpoint's fastest sound form

    @property
    def key(self) -> Key:
        return (self.server, self.model, self.per_request, self.api, self.served_form)


HEADER = (
    f"{'server':<8} {'api':<8} {'model':<5} {'form':<10} {'wk':>2} {'img':>3} {'c':>4} {'req/s':>8} "
    f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'err':>4} {'cpu ms/req':>10} {'wrk cpu%':>8} {'rss MB/wk':>9} "
    f"{'ready s':>7}"
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="measured time per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="service and empty-app workers")
    parser.add_argument("--mlp", type=Path, default=ROOT / "models" / "course_network.pt")
    parser.add_argument("--cnn", type=Path, default=ROOT / "models" / "fashion_cnn.pt")
    parser.add_argument("--quick", action="store_true", help="only the c=32 rows and the ratios")
    parser.add_argument(
        "--only", help="run just the rows of servers (naive, empty, service) or apis (v2-fp32, grpc-fp32, ...), a,b"
    )
    return parser.parse_args(argv)


def _cases(args: argparse.Namespace) -> list[Case]:
    levels = (32,) if args.quick else (1, 8, 32, 128)
    w = args.workers
    cases = [
        Case("naive", "mlp", 1, 1, levels),
        Case("empty", "mlp", w, 1, levels),
        Case("service", "mlp", w, 1, levels),
        Case("service", "mlp", w, 8, (8, 32)),
        Case("naive", "cnn", 1, 1, (32,)),
        Case("service", "cnn", w, 1, levels),
        Case("service", "cnn", w, 8, (8, 32)),
        Case("service", "cnn", w, 1, levels, served_form=TORCH_FP32),
        Case("service", "cnn", w, 8, (8, 32), served_form=TORCH_FP32),
        Case("service", "mlp", w, 1, (32,), "v2-fp32"),
        Case("service", "mlp", w, 32, (32,), "v2-fp32"),
        Case("service", "mlp", w, 1, (32,), "v2-bytes"),
        Case("service", "mlp", w, 1, (32,), "grpc-fp32"),
        Case("service", "mlp", w, 32, (32,), "grpc-fp32"),
    ]
    return [c for c in cases if {c.server, c.api} & set(args.only.split(","))] if args.only else cases


def _bodies(tmp: Path, case: Case, checkpoint: Path, pngs: list[bytes]) -> tuple[Path, str]:
    """The request bodies wrk sends for `case` (written once per api, model and size), and their type."""
    bodies = tmp / f"{case.api}-{case.model}-{case.per_request}"
    if not bodies.exists():
        bodies.mkdir()
        if case.api == "predict":
            content_type = write_bodies(bodies, pngs, case.per_request)
        else:
            datatype = "BYTES" if case.api == "v2-bytes" else "FP32"
            write_v2_bodies(bodies, checkpoint, pngs, case.per_request, datatype)
            content_type = "application/octet-stream"
        (bodies / "type").write_text(content_type)
    return bodies, (bodies / "type").read_text()


@dataclass
class Health:
    """/health/live probed while /predict runs at c=32 (the MLP, one image per request)."""

    p99_ms: float | None = None
    failures: int = 0


def _run_case(
    case: Case, checkpoint: Path, bodies: Path, content_type: str, args: argparse.Namespace, health: Health
) -> dict[int, dict]:
    """Start the case's server, drive each concurrency level, print its rows; rows by level."""
    path = "/predict?k=3" if case.api == "predict" else f"/v2/models/{checkpoint.stem}/infer"
    rows = {}
    with started(case.server, checkpoint, case.workers, case.served_form) as server:
        for c in case.concurrency:
            probe = None
            if case.api == "predict" and case.per_request == 1 and c == 32 and case.model == "mlp":
                probe = LivenessProbe(server.port)
                probe.start()
            if case.api == "grpc-fp32":
                model, per = checkpoint.stem, case.per_request
                row = rows[c] = drive_grpc(server, bodies, model, per, c, args.seconds, args.warmup)
            else:
                row = rows[c] = drive(server, bodies, content_type, c, args.seconds, args.warmup, path)
            if probe:
                probe.stopping.set()
                probe.join()
                health.p99_ms, health.failures = probe.p99_ms(), probe.failures
            print(
                f"{case.server:<8} {case.api:<8} {case.model:<5} {_form(case):<10} {case.workers:>2} "
                f"{case.per_request:>3} {c:>4} "
                f"{row['rps']:>8.0f} {row['p50']:>7.2f} {row['p90']:>7.2f} {row['p99']:>7.2f} "
                f"{row['errors']:>4} {row['cpu_ms']:>10.2f} {row['wrk_cpu']:>8.0f} {row['rss']:>9.0f} "
                f"{server.ready_s:>7.2f}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    checkpoints = {"mlp": args.mlp, "cnn": args.cnn}
    pngs = fashion_pngs(256)
    print(
        f"machine: {os.cpu_count()} CPUs, {platform_line()}; {args.seconds:g} s per row after {args.warmup:g} s warm-up"
    )
    print(HEADER)
    results: dict[tuple[Key, int], dict] = {}
    health = Health()
    with tempfile.TemporaryDirectory() as tmp:
        for case in _cases(args):
            bodies, content_type = _bodies(Path(tmp), case, checkpoints[case.model], pngs)
            for c, row in _run_case(case, checkpoints[case.model], bodies, content_type, args, health).items():
                results[(case.key, c)] = row
    _print_grpc_ratios(results)
    if args.only:
        if health.p99_ms is not None:
            print(f"/health/live p99 while /predict runs at c=32: {health.p99_ms:.2f} ms, {health.failures} failed")
        return 0
    _print_ratios(results, health, args.quick)
    return 0


def _print_grpc_ratios(results: dict[tuple[Key, int], dict]) -> None:
    """gRPC against REST v2, the same raw FP32 tensors, where both rows ran."""
    for per in (1, 32):
        grpc_row = results.get((("service", "mlp", per, "grpc-fp32", "auto"), 32))
        rest_row = results.get((("service", "mlp", per, "v2-fp32", "auto"), 32))
        if grpc_row and rest_row:
            ratio = grpc_row["rps"] / rest_row["rps"]
            print(f"c=32, MLP, {per:>2} images: gRPC / REST v2 (binary FP32) images/s = {ratio:.2f}x (target >= 0.85x)")


def _form(case: Case) -> str:
    return "" if case.server != "service" or case.model != "cnn" else case.served_form


def _print_ratios(results: dict[tuple[Key, int], dict], health: Health, quick: bool) -> None:
    def row(server: str, model: str = "mlp", per: int = 1, c: int = 32, api: str = "predict", **form: str) -> dict:
        return results[((server, model, per, api, form.get("form", "auto")), c)]

    def rps(server: str, model: str = "mlp", per: int = 1, c: int = 32, api: str = "predict") -> float:
        return float(row(server, model, per, c, api)["rps"])

    print()
    print(f"c=32, course MLP: service / naive  = {rps('service') / rps('naive'):.2f}x   (target >= 3x)")
    print(f"c=32, course MLP: service / empty  = {rps('service') / rps('empty'):.2f}x   (target >= 0.7x)")
    print(f"c=32, CNN:        service / naive  = {rps('service', 'cnn') / rps('naive', 'cnn'):.2f}x")
    if not quick:
        p50 = row("service", c=1)["p50"]
        print(f"c=1,  course MLP: service p50 = {p50:.2f} ms   (target <= 0.6 ms)")
        cnn_p50 = row("service", "cnn", c=1)["p50"]
        print(f"c=1,  CNN (auto form): service p50 = {cnn_p50:.2f} ms = {cnn_p50 / p50:.2f}x the MLP's   (<= 1x)")
    p99 = row("service")["p99"]
    print(f"c=32, course MLP: service p99 = {p99:.2f} ms   (target <= 15 ms)")
    print(
        f"/health/live p99 while /predict runs at c=32: {health.p99_ms:.2f} ms, {health.failures} failed   "
        "(target <= 5 ms)"
    )
    images_per_s = rps("service", "mlp", 8, 32) * 8
    ratio = images_per_s / rps("service")
    print(f"8 images per request, c=32, MLP: {images_per_s:.0f} images/s = {ratio:.2f}x single-image requests")
    v2_fp32 = rps("service", api="v2-fp32") / rps("service")
    v2_batch = rps("service", per=32, api="v2-fp32") * 32 / rps("service")
    v2_bytes = rps("service", api="v2-bytes") / rps("service")
    print(f"c=32, MLP: v2 FP32 binary, 1 image / /predict        = {v2_fp32:.2f}x req/s   (target >= 1.2x)")
    print(f"c=32, MLP: v2 FP32 binary, 32 images, images/s / /predict = {v2_batch:.2f}x   (target >= 4x)")
    print(f"c=32, MLP: v2 BYTES (PNG), 1 image / /predict        = {v2_bytes:.2f}x req/s   (target >= 0.9x)")
    _print_cnn_ratios(row)


def _print_cnn_ratios(row: Callable[..., dict]) -> None:
    """The default CNN per served form, against the stack's ceiling (empty) and the course MLP."""
    fast, fp32 = row("service", "cnn")["rps"], row("service", "cnn", form=TORCH_FP32)["rps"]
    empty, mlp = row("empty")["rps"], row("service")["rps"]
    print(f"c=32, CNN: auto form / empty = {fast / empty:.2f}x   (target >= 0.75x); {TORCH_FP32}: {fp32 / empty:.2f}x")
    print(f"c=32, CNN: auto form / course MLP = {fast / mlp:.2f}x   (target >= 0.8x)")
    print(f"c=32, CNN: auto form / {TORCH_FP32} = {fast / fp32:.2f}x req/s   (target >= 2x)")
    batch = row("service", "cnn", 8)["rps"] / row("service", "cnn", 8, form=TORCH_FP32)["rps"]
    print(f"c=32, CNN, 8 images per request: auto form / {TORCH_FP32} = {batch:.2f}x images/s   (target >= 2x)")


def platform_line() -> str:
    import platform

    import torch

    return f"Python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}"


if __name__ == "__main__":
    sys.exit(main())
