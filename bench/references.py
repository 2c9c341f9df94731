"""The two reference servers the benchmark measures beside the service.

- `naive`: the course-style app: decode and forward inline in an `async def` handler.
- `empty`: an upload endpoint that reads the file and does nothing: the ceiling.
Both read the checkpoint path from BENCH_CHECKPOINT.
"""

from __future__ import annotations

import io
import os

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
