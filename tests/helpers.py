"""Builders shared by the tests: tiny fixed-weight checkpoints and encoded images."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import PreprocessConfig, build_model, save_checkpoint

TINY_ARGS = {"input_size": 784, "output_size": 10, "hidden_layers": [16], "drop_p": 0.5}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("network", TINY_ARGS).eval()


def write_tiny_checkpoint(path: Path, seed: int = 0, **kwargs: object) -> Path:
    return save_checkpoint(path, tiny_model(seed), "network", TINY_ARGS, PreprocessConfig(), **kwargs)  # type: ignore[arg-type]


def write_repository(root: Path, config: dict[str, object] | None = None) -> Path:
    """A model repository of tiny checkpoints: shirts versions 1 and 2, shoes version 1, and
    `config` as shirts' config.json."""
    for name, version, seed in (("shirts", 1, 1), ("shirts", 2, 2), ("shoes", 1, 3)):
        write_tiny_checkpoint(root / name / str(version) / "model.pt", seed=seed)
    if config is not None:
        (root / "shirts" / "config.json").write_text(json.dumps(config))
    return root


def garment(size: tuple[int, int] = (28, 28), seed: int = 0) -> np.ndarray:
    """A light blob on black, the way Fashion-MNIST items look (uint8, H x W)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 3)) ** 2 < 1
    pixels = np.where(mask, rng.integers(120, 256, (h, w)), 0)
    return pixels.astype(np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png(size: tuple[int, int] = (28, 28), mode: str = "L", seed: int = 0) -> bytes:
    return encode(Image.fromarray(garment(size, seed)).convert(mode))


def garment_pngs(count: int = 4) -> list[bytes]:
    """Garment-like PNGs of different widths (28, 36, 44, ... by 28)."""
    return [encode(Image.fromarray(garment((28 + 8 * seed, 28), seed=seed))) for seed in range(count)]


def multipart(files: list[tuple[str, bytes]], boundary: str = "b", field: str = "file") -> tuple[bytes, str]:
    """A plain multipart/form-data body of (filename, data) parts named `field`, and its content type."""
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n\r\n'.encode()
        + data
        + b"\r\n"
        for name, data in files
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_for(condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.1) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass; whether it came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def workers_of(supervisor: int) -> list[int]:
    """The supervisor's child processes (a killed one stays listed until it is reaped)."""
    return [int(pid) for pid in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]


LISTEN, ESTABLISHED = "0A", "01"  # TCP states as /proc/net/tcp writes them


def sockets_by_process(pids: Iterable[int], port: int, state: str) -> dict[int, int]:
    """How many TCP sockets on local `port` in `state` each process holds (0 for one that ended)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in pids:
        try:
            counts[pid] = sum(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
        except FileNotFoundError:  # the process ended
            counts[pid] = 0
    return counts
