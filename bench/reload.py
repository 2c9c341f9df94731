"""Requests answered and failed while the model is reloaded under load, on 127.0.0.1.

`python -m bench.reload` serves a checkpoint with `python -m app` (2 workers), drives it with
`--clients` keep-alive clients (alternating /predict uploads and v2 tensors) for `--seconds`,
and meanwhile: replaces the file with another valid checkpoint and sends SIGHUP, then writes a
broken file and sends SIGHUP again. It prints what the clients got and what /metrics says.
Stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _client(port: int, stop: threading.Event, statuses: Counter[str], lock: threading.Lock, index: int) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (28, 28), index % 200).save(buffer, "PNG")
    boundary = "reloadbench"
    upload = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    tensor = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    sent = 0
    while not stop.is_set():
        try:
            if sent % 2:
                connection.request(
                    "POST", "/predict", upload, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
                )
            else:
                connection.request("POST", "/v2/models/model/infer", tensor.encode())
            response = connection.getresponse()
            response.read()
            outcome = str(response.status)
        except (OSError, http.client.HTTPException) as exc:
            outcome = type(exc).__name__
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with lock:
            statuses[outcome] += 1
        sent += 1


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return str(response.read().decode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reload", description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    path = folder / "model.pt"
    path.write_bytes((ROOT / "models" / "course_network.pt").read_bytes())
    port = 18900 + os.getpid() % 100
    env = {**os.environ, "FASHION_SERVE_CHECKPOINT": str(path), "FASHION_SERVE_LOG_LEVEL": "warning"}
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port), "--workers", "2"], cwd=ROOT, env=env
    )
    try:
        for _ in range(300):
            try:
                _get(port, "/health/ready")
                break
            except OSError:
                time.sleep(0.1)
        stop, lock, statuses = threading.Event(), threading.Lock(), Counter[str]()
        clients = [
            threading.Thread(target=_client, args=(port, stop, statuses, lock, i), daemon=True)
            for i in range(args.clients)
        ]
        for client in clients:
            client.start()
        third = args.seconds / 3
        time.sleep(third)
        path.write_bytes((ROOT / "models" / "fashion_cnn.pt").read_bytes())  # a valid, different model
        server.send_signal(signal.SIGHUP)
        time.sleep(third)
        path.write_bytes(b"a broken copy")
        server.send_signal(signal.SIGHUP)
        time.sleep(third)
        stop.set()
        for client in clients:
            client.join(30)
        metrics = _get(port, "/metrics")
        reloads = dict(re.findall(r'fashion_serve_model_reloads_total\{result="(\w+)"\} ([0-9.]+)', metrics))
        arch = json.loads(_get(port, "/model"))["arch"]
        failed = sum(count for outcome, count in statuses.items() if outcome != "200")
        print(
            f"{args.clients} clients, {args.seconds:g} s, a good reload then a broken one: "
            f"{sum(statuses.values())} requests, {failed} failed {dict(statuses)}; reloads {reloads}; serving {arch}"
        )
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
