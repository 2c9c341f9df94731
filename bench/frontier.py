"""Served accuracy against serving speed, for several checkpoints in one run: which model is the
better default.

    python -m bench.frontier CHECKPOINT [CHECKPOINT ...] [--seconds 8] [--rounds 3]

For each checkpoint, `python -m app` serves it with the default settings (its int8 form where it
has a sound one); all 10,000 Fashion-MNIST test images are sent to `/predict` as PNG uploads and
the answers' top class is scored against the labels (served accuracy: decoding, preprocessing
and the served form included); then `/predict` at c=32 with wrk, the checkpoints alternating for
`--rounds` (each round starting one checkpoint further on), the median req/s of each, as a ratio
to the first checkpoint's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import drive, fashion_pngs, rotated, started, write_bodies

ACCURACY_CLIENTS = 8


@dataclass
class Row:
    accuracy: float  # served, on the whole test set
    form: str  # the served form `/model` names
    ready_s: float
    rps: list[float] = field(default_factory=list)  # /predict c=32, one per round


def served_accuracy(port: int, pngs: list[bytes], labels: list[int]) -> float:
    """The share of `pngs` whose top class through /predict is its label."""
    boundary = "frontierboundary"

    def ask(png: bytes) -> int:
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + png
            + f"\r\n--{boundary}--\r\n".encode()
        )
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(
                "POST", "/predict?k=1", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            )
            response = connection.getresponse()
            answer = json.loads(response.read())
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"/predict answered {response.status}: {answer}")
        return int(answer["predictions"][0]["top_k"][0]["index"])

    with concurrent.futures.ThreadPoolExecutor(ACCURACY_CLIENTS) as pool:
        answers = list(pool.map(ask, pngs))
    return sum(predicted == label for predicted, label in zip(answers, labels, strict=True)) / len(labels)


def _form(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/model")
        described = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return str(described.get("served_form", {}).get("name", "?"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontier", description=__doc__)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    from training.data import load_fashion_mnist

    test = load_fashion_mnist().test
    pngs, labels = fashion_pngs(len(test.labels)), [int(y) for y in test.labels]
    rows: dict[Path, Row] = {}
    for path in args.checkpoints:
        with started("service", path, args.workers) as server:
            rows[path] = Row(served_accuracy(server.port, pngs, labels), _form(server.port), server.ready_s)
        print(f"{path.name}: served accuracy {100 * rows[path].accuracy:.2f}% ({rows[path].form})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        content_type = write_bodies(Path(tmp), pngs[:256], 1)
        for round_ in range(args.rounds):
            for path in rotated(args.checkpoints, round_):
                with started("service", path, args.workers) as server:
                    measured = drive(server, Path(tmp), content_type, 32, args.seconds, args.warmup)
                rows[path].rps.append(measured["rps"])
                print(f"  {path.name:<28} {measured['rps']:8.0f} req/s  p99 {measured['p99']:6.2f} ms", flush=True)
    first = statistics.median(rows[args.checkpoints[0]].rps)
    print(
        f"{'checkpoint':<28} {'MB':>5} {'form':<10} {'served acc':>10} {'req/s c=32':>10} {'ratio':>6} {'ready s':>7}"
    )
    for path, row in rows.items():
        rps = statistics.median(row.rps)
        print(
            f"{path.name:<28} {path.stat().st_size / 2**20:5.2f} {row.form:<10} {100 * row.accuracy:9.2f}% "
            f"{rps:10.0f} {rps / first:6.3f} {row.ready_s:7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
