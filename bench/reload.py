"""Requests answered and failed while the model is reloaded under load, on 127.0.0.1.

`python -m bench.reload` serves a checkpoint with `python -m app` (2 workers), drives it with
`--clients` keep-alive clients (alternating /predict uploads and v2 tensors) for `--seconds`,
and meanwhile: replaces the file with another valid checkpoint and sends SIGHUP, then writes a
broken file and sends SIGHUP again. It prints what the clients got and what /metrics says.
Stops by itself.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.clients import KeepAliveLoad, Request
from bench.server import ROOT, serving


def _requests(index: int) -> list[Request]:
    """A /predict upload and a v2 tensor, in turn."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (28, 28), index % 200).save(buffer, "PNG")
    boundary = "reloadbench"
    upload = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    tensor = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}
    return [
        ("POST", "/v2/models/model/infer", json.dumps(tensor).encode(), {}),
        ("POST", "/predict", upload, {"Content-Type": f"multipart/form-data; boundary={boundary}"}),
    ]


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return str(response.read().decode())


def _validation_s(port: int) -> str:
    """How long the last reload's validation took, as /metrics says."""
    found = re.search(r"^fashion_serve_model_last_reload_validation_seconds (\S+)$", _get(port, "/metrics"), re.M)
    return f"{float(found.group(1)):.2f}" if found else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reload", description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    path = folder / "model.pt"
    path.write_bytes((ROOT / "models" / "course_network.pt").read_bytes())
    env = {"FASHION_SERVE_CHECKPOINT": str(path), "FASHION_SERVE_LOG_LEVEL": "warning"}
    with serving(env, workers=2, capture=False) as (server, port):
        load = KeepAliveLoad(port, args.clients, _requests).start()
        third = args.seconds / 3
        time.sleep(third)
        path.write_bytes((ROOT / "models" / "fashion_cnn.pt").read_bytes())  # a valid, different model
        server.send_signal(signal.SIGHUP)
        time.sleep(third)
        good_s = _validation_s(port)
        path.write_bytes(b"a broken copy")
        server.send_signal(signal.SIGHUP)
        time.sleep(third)
        broken_s = _validation_s(port)
        load.stop()
        print(f"validation under load: the good file {good_s} s, the broken one {broken_s} s")
        metrics = _get(port, "/metrics")
        reloads = dict(re.findall(r'fashion_serve_model_reloads_total\{result="(\w+)"\} ([0-9.]+)', metrics))
        arch = json.loads(_get(port, "/model"))["arch"]
        print(
            f"{args.clients} clients, {args.seconds:g} s, a good reload then a broken one: "
            f"{sum(load.outcomes.values())} requests, {load.failed} failed {dict(load.outcomes)}; "
            f"reloads {reloads}; serving {arch}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
