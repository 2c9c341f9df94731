"""gRPC ModelInfer beside KServe's `ModelServer`: requests/s and server CPU per call, same model.

`python -m bench.peers --kserve-path DIR` serves the course MLP twice on 127.0.0.1, by this
service (gRPC on, default settings but one worker each side) and by KServe's `ModelServer`
running a `kserve.Model` written here in a few lines (torch, the same checkpoint, the
probabilities as its one output), and drives both with the same ModelInfer messages (32
normalized images as raw FP32 contents) from h2load and from the Python grpc.aio client of
`bench.grpc_load`, the two servers alternating for `--rounds`. Server CPU is psutil's over the
server process and its children. KServe is not a dependency of this project: install it
apart (`pip install --target DIR --no-deps kserve` and what it imports) and name the folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.run import Server, drive_grpc, fashion_pngs, started, write_v2_bodies
from bench.server import HOST, ROOT, free_port, stop_server

CHECKPOINT = ROOT / "models" / "course_network.pt"
MODEL = "course_network"


def serve_kserve(checkpoint: Path, name: str) -> None:
    """Run KServe's ModelServer with the checkpoint as a `kserve.Model` (in this process)."""
    import kserve
    import torch
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    from models import load_checkpoint

    torch.set_num_threads(1)

    class Classifier(kserve.Model):
        def __init__(self) -> None:
            super().__init__(name)
            self.model = load_checkpoint(checkpoint).model
            self.ready = True

        def predict(self, payload: InferRequest, headers: Any = None, response_headers: Any = None) -> InferResponse:
            with torch.inference_mode():
                probabilities = self.model(torch.from_numpy(payload.inputs[0].as_numpy())).exp().numpy()
            output = InferOutput(name="probabilities", shape=list(probabilities.shape), datatype="FP32")
            output.set_data_from_numpy(probabilities, binary_data=True)
            return InferResponse(model_name=name, infer_outputs=[output], response_id=payload.id)

    kserve.ModelServer().start([Classifier()])


@contextmanager
def kserve_started(kserve_path: Path, checkpoint: Path) -> Iterator[Server]:
    """KServe's ModelServer, one worker, ready on loopback ports; stopped at the end."""
    http_port, grpc_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "bench.peers", "serve-kserve", str(checkpoint),
        "--http_port", str(http_port), "--grpc_port", str(grpc_port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(kserve_path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait(process, f"http://{HOST}:{http_port}/v2/models/{MODEL}/ready")
        yield Server("kserve", process, http_port, time.perf_counter() - began, grpc_port)
    finally:
        stop_server(process)


def _wait(process: subprocess.Popen[str], url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"KServe's server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"KServe's server not ready after {timeout:g} s")


def _servers(kserve_path: Path) -> dict[str, Callable[[], Any]]:
    return {
        "fashion-serve": lambda: started("service", CHECKPOINT, workers=1),
        "kserve": lambda: kserve_started(kserve_path, CHECKPOINT),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-kserve"]:
        sys.argv = [sys.argv[0], *argv[2:]]  # KServe reads its own options from sys.argv at import
        serve_kserve(Path(argv[1]), MODEL)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kserve-path", type=Path, required=True, help="a folder holding kserve and its imports")
    parser.add_argument("--images", type=int, default=32, help="images per ModelInfer call")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        bodies = Path(folder)
        write_v2_bodies(bodies, CHECKPOINT, fashion_pngs(256), args.images, "FP32")
        for round_ in range(args.rounds):
            for name, start in _servers(args.kserve_path).items():
                with start() as server:
                    for client in ("h2load", "grpc.aio"):
                        row = _drive(server, bodies, client, args)
                        rows.setdefault((name, client), []).append(row)
                        print(
                            f"round {round_ + 1} {name:<14} {client:<9} {row['rps']:7.0f} calls/s "
                            f"{row['cpu_ms']:6.3f} ms CPU/call  errors {row['errors']}",
                            flush=True,
                        )
    print(f"\n{'server':<14} {'client':<9} {'calls/s':>8} {'images/s':>9} {'CPU ms/call':>12}  (medians)")
    for (name, client), runs in rows.items():
        rps, cpu = statistics.median(r["rps"] for r in runs), statistics.median(r["cpu_ms"] for r in runs)
        print(f"{name:<14} {client:<9} {rps:8.0f} {rps * args.images:9.0f} {cpu:12.3f}")
    return 0


def _drive(server: Server, bodies: Path, client: str, args: argparse.Namespace) -> dict[str, float]:
    return drive_grpc(
        server, bodies, MODEL, args.images, args.connections, args.seconds, args.warmup, h2load=client == "h2load"
    )


if __name__ == "__main__":
    raise SystemExit(main())
