"""Throughput of the inference step with and without batching, on one device.

    python -m bench.batching --device cuda [--checkpoint models/fashion_cnn.pt] [--seconds 5]

The service's own inference step (`ServedModel.run_batch`: decode, forward pass,
probabilities back on the host) over real Fashion-MNIST test PNGs, one request at a time
(what an unbatched server does) and then groups of 8, 32 and 128 requests (what the
micro-batcher hands it under load). Prints images/s per group size and the ratio to
unbatched. In-process, no HTTP: this isolates what batching buys on the device; `python -m
bench` measures the service end to end. Short by design: made for a lent GPU's few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "fashion_cnn.pt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=5.0, help="per group size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    args = parser.parse_args(argv)
    from functools import partial

    import torch

    from app.protocols.predict import decode_body
    from app.served_model import Pending, ServedModel
    from app.settings import Settings
    from bench.run import fashion_pngs, write_bodies

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu to measure the CPU")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        content_type = write_bodies(Path(tmp), fashion_pngs(256), 1)
        bodies = [(Path(tmp) / f"body_{i}.bin").read_bytes() for i in range(256)]
    settings = Settings(checkpoint=args.checkpoint, device=args.device, max_batch_size=max(args.sizes))
    service = ServedModel.load(settings)
    uploads: list[Pending] = [
        partial(decode_body, body, content_type, service.loaded.preprocess, settings) for body in bodies
    ]
    name = torch.cuda.get_device_name() if service.device.type == "cuda" else "cpu"
    print(f"{args.checkpoint.name} on {service.device} ({name}), torch {torch.__version__}")

    rates = {}
    for size in args.sizes:
        service.run_batch(uploads[:size])  # warm-up: kernels, allocator
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            first = images % 256
            group = (uploads[first:] + uploads[:first])[:size]
            answers = service.run_batch(group)  # returns host-side rows: the device has finished
            images += len(answers)
        rates[size] = images / (time.perf_counter() - start)
    for size, rate in rates.items():
        print(f"requests per step {size:>4}: {rate:9.0f} images/s   {rate / rates[args.sizes[0]]:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
