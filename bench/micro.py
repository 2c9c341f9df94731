"""Per-stage costs of /predict, in-process, best of 7 runs: where a request's time goes.

    python -m bench.micro [--checkpoint models/fashion_cnn.pt] [--served-form torch-fp32]

Stages: the multipart split, decoding one upload to model input, the forward pass at batch
1 and 16, the inference thread's whole step (decode + forward) for 1 and for 16 requests,
and the event-loop thread's share of a request (middleware + endpoint, with the inference
step replaced by a precomputed answer). No sockets, no server processes: these numbers
isolate the code; `python -m bench` measures the service as clients see it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.server import ROOT

if TYPE_CHECKING:
    from app.served_model import ServedModel
    from app.settings import Settings


def best_us(run: Callable[[int], object], n: int) -> float:
    """Microseconds per call, the best of 7 runs of n calls (the least disturbed by neighbours)."""
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for i in range(n):
            run(i)
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "course_network.pt")
    parser.add_argument(
        "--served-form", default="auto", help="auto, torch-fp32 or onnx-int8 (FASHION_SERVE_SERVED_FORM)"
    )
    return parser.parse_args(argv)


@dataclass
class _Requests:
    """Single-image /predict bodies of real test images, and the served model they go to."""

    bodies: list[bytes]
    content_type: str
    settings: Settings
    service: ServedModel

    @classmethod
    def load(cls, count: int = 256) -> _Requests:
        """From the FASHION_SERVE_* environment, as the service would."""
        import tempfile

        from app.served_model import ServedModel
        from app.settings import Settings
        from bench.run import fashion_pngs, write_bodies

        with tempfile.TemporaryDirectory() as tmp:
            content_type = write_bodies(Path(tmp), fashion_pngs(count), 1)
            bodies = [(Path(tmp) / f"body_{i}.bin").read_bytes() for i in range(count)]
        settings = Settings()
        return cls(bodies, content_type, settings, ServedModel.load(settings))


def _inference_rows(requests: _Requests) -> list[tuple[str, float]]:
    """Microseconds of each stage on the inference side: split, decode, forward pass, whole step."""
    from functools import partial

    import numpy as np

    from app.http.multipart import parse_multipart
    from app.protocols.predict import decode_body
    from app.served_model import Pending

    bodies, content_type = requests.bodies, requests.content_type
    settings, service = requests.settings, requests.service
    preprocess = service.loaded.preprocess
    uploads: list[Pending] = [partial(decode_body, body, content_type, preprocess, settings) for body in bodies]
    inputs = [decode_body(body, content_type, preprocess, settings) for body in bodies]
    arrays = [d.inputs for d in inputs if d.inputs is not None]
    batches = [np.concatenate(arrays[j * 16 : (j + 1) * 16]) for j in range(16)]

    def split(i: int) -> object:
        return parse_multipart(bodies[i % 256], content_type, "file", 16)

    def decode(i: int) -> object:
        return decode_body(bodies[i % 256], content_type, preprocess, settings)

    def forward_1(i: int) -> object:
        return service.score(arrays[i % 256])

    def forward_16(i: int) -> object:
        return service.score(batches[i % 16])

    def step_1(i: int) -> object:
        return service.run_batch([uploads[i % 256]])

    def step_16(i: int) -> object:
        return service.run_batch(uploads[(i % 16) * 16 : (i % 16) * 16 + 16])

    return [
        ("multipart split (one image)", best_us(split, 2000)),
        ("decode one upload to model input", best_us(decode, 1000)),
        ("forward pass, batch of 1", best_us(forward_1, 300)),
        ("forward pass, batch of 16 (per image)", best_us(forward_16, 30) / 16),
        ("inference step, 1 request", best_us(step_1, 300)),
        ("inference step, 16 requests (per request)", best_us(step_16, 30) / 16),
    ]


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    # Set before the app's modules read them.
    os.environ.update(
        FASHION_SERVE_CHECKPOINT=str(args.checkpoint),
        FASHION_SERVE_DEVICE="cpu",
        FASHION_SERVE_LOG_LEVEL="warning",
        FASHION_SERVE_SERVED_FORM=args.served_form,
    )
    import torch

    torch.set_num_threads(1)
    requests = _Requests.load()
    form = requests.service.form.name
    print(f"checkpoint: {args.checkpoint.name} as {form}; torch {torch.__version__}, 1 thread; microseconds, best of 7")
    rows = _inference_rows(requests)
    share = asyncio.run(_event_loop_share(requests.bodies, requests.content_type))
    rows.append(("event-loop thread's share of a request", share))
    for name, micros in rows:
        print(f"{name:<44} {micros:9.1f}")
    return 0


async def _event_loop_share(bodies: list[bytes], content_type: str) -> float:
    """Middleware + endpoint per /predict through the real app, the inference step stubbed."""
    from functools import partial

    from app.main import create_app
    from app.protocols.predict import decode_body

    app = create_app()
    lifespan: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    started = asyncio.Event()

    async def lifespan_send(message: MutableMapping[str, Any]) -> None:
        started.set()

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan.get, lifespan_send))
    await lifespan.put({"type": "lifespan.startup"})
    await started.wait()
    service = app.state.worker.plane.model
    first = partial(decode_body, bodies[0], content_type, service.loaded.preprocess, service.settings)
    answer = service.run_batch([first])[0]

    async def answered(item: object, deadline: float | None = None, trace: object = None) -> object:
        return answer

    service.batcher.submit = answered
    raw_type = content_type.encode()

    async def one(i: int) -> None:
        body = bodies[i % len(bodies)]
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop()

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"/predict answered {message['status']}: the stub no longer fits the app")

        headers = [(b"host", b"bench"), (b"content-type", raw_type), (b"content-length", str(len(body)).encode())]
        scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"k=3"}
        scope |= {"headers": headers, "http_version": "1.1", "scheme": "http", "root_path": "", "app": app}
        await app(scope, receive, send)

    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for i in range(2000):
            await one(i)
        best = min(best, (time.perf_counter() - start) / 2000)
    await lifespan.put({"type": "lifespan.shutdown"})
    await task
    return best * 1e6


if __name__ == "__main__":
    sys.exit(main())
