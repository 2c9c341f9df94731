"""The two reference servers the benchmark measures beside the service.

- `naive`: the course-style app: decode and forward inline in an `async def` handler.
- `empty`: an upload endpoint that reads the file and does nothing: the ceiling.
Both read the checkpoint path from BENCH_CHECKPOINT. `python -m bench.references NAME --port P
--workers N` serves one with exactly the service's server settings (app.serving).
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import torch
from fastapi import FastAPI, UploadFile
from PIL import Image

from models import load_checkpoint

naive = FastAPI()
empty = FastAPI()
_loaded = load_checkpoint(os.environ["BENCH_CHECKPOINT"]) if "BENCH_CHECKPOINT" in os.environ else None


@naive.post("/predict")
async def naive_predict(file: UploadFile, k: int = 3) -> dict[str, object]:
    assert _loaded is not None
    image = Image.open(io.BytesIO(await file.read())).convert("L").resize((28, 28))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        ps = torch.exp(_loaded.model(x.view(1, 1, 28, 28)))
    top_p, top_i = ps.topk(k, dim=1)
    names = _loaded.class_names
    return {
        "predictions": [
            {"label": names[i], "probability": p} for p, i in zip(top_p[0].tolist(), top_i[0].tolist(), strict=True)
        ]
    }


@naive.get("/health/ready")
@empty.get("/health/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@empty.post("/predict")
async def empty_predict(file: UploadFile) -> dict[str, object]:
    await file.read()
    return {"predictions": []}


def main(argv: list[str] | None = None) -> int:
    from app.logs import configure_logging
    from app.server import serve
    from app.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m bench.references")
    parser.add_argument("name", choices=["naive", "empty"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    settings = Settings().model_copy(update={"host": args.host, "port": args.port, "workers": args.workers})
    configure_logging(settings.log_format, settings.log_level)
    return serve(settings, lambda: {"naive": naive, "empty": empty}[args.name])


if __name__ == "__main__":
    sys.exit(main())
