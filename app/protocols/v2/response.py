"""Encoding a v2 answer: outputs as JSON data or binary tensor data, the classification
extension, and every refusal as `{"error": message}` (`render_error`, the protocol's one renderer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.errors import ServeError
from app.http.messages import Reply, dump_json
from app.protocols.v2.request import BYTES_LENGTH, OOD_SCORE, InferRequest
from app.served_model import Scored, ServedModel


def render_error(exc: ServeError) -> Reply:
    """Every v2 refusal, from the inference endpoint and the FastAPI routes alike."""
    return Reply(exc.status, dump_json({"error": exc.message}), headers=exc.headers)


def _tensor(
    name: str, datatype: str, shape: list[int], values: Any, binary: bool, blobs: list[bytes]
) -> dict[str, Any]:
    """One output: its data inline in JSON, or appended to `blobs` (binary tensor data)."""
    if not binary:
        return {"name": name, "datatype": datatype, "shape": shape, "data": values}
    if datatype == "BYTES":
        blob = b"".join(BYTES_LENGTH.pack(len(v)) + v for v in (s.encode() for s in values))
    else:
        blob = np.ascontiguousarray(values, dtype="<f4").tobytes()
    blobs.append(blob)
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(blob)}}


def classification(probabilities: np.ndarray, k: int, class_names: Sequence[str]) -> list[str]:
    """Triton's classification extension: per image the top k as "probability:index:label", flat."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [f"{row[i]:.6f}:{i}:{class_names[i]}" for row, top in zip(probabilities, order, strict=True) for i in top]


def encode(request: InferRequest, scored: Scored, service: ServedModel) -> Reply:
    """The answer: JSON, or with binary outputs the JSON header then the tensors' bytes."""
    probabilities = scored.probabilities
    n, classes = probabilities.shape
    blobs: list[bytes] = []
    outputs = []
    for output in request.outputs:
        if output.name == OOD_SCORE:
            scores = scored.ood_scores
            assert scores is not None  # only offered when the checkpoint has the statistics
            values = scores if output.binary else scores.tolist()
            outputs.append(_tensor(output.name, "FP32", [n, 1], values, output.binary, blobs))
        elif output.classification:
            values = classification(probabilities, output.classification, service.class_names)
            outputs.append(_tensor(output.name, "BYTES", [n, output.classification], values, output.binary, blobs))
        elif output.binary:
            outputs.append(_tensor(output.name, "FP32", [n, classes], probabilities, True, blobs))
        else:
            outputs.append(_tensor(output.name, "FP32", [n, classes], probabilities.ravel().tolist(), False, blobs))
    response: dict[str, Any] = {"model_name": service.name, "model_version": service.settings.model_version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    text = dump_json(response)
    if not blobs:
        return Reply(200, text)
    extra = {"Inference-Header-Content-Length": str(len(text))}
    return Reply(200, b"".join([text, *blobs]), b"application/octet-stream", extra)
