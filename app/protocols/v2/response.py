"""Encoding a v2 answer: outputs as JSON data or binary tensor data, the classification
extension, and every refusal as `{"error": message}` (`render_error`, the protocol's one renderer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import ServeError
from app.http.messages import Reply, dump_json
from app.protocols.v2.request import BYTES_LENGTH, OOD_SCORE, InferRequest
from app.served_model import Scored, ServedModel


def render_error(exc: ServeError) -> Reply:
    """Every v2 refusal, from the inference endpoint and the FastAPI routes alike."""
    return Reply(exc.status, dump_json({"error": exc.message}), headers=exc.headers)


@dataclass
class OutputTensor:
    """One output, whatever the transport: FP32 values, or BYTES strings (classification)."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[str]

    def raw(self) -> bytes:
        """The tensor's bytes as v2 lays them out (binary tensor data, gRPC's raw contents): FP32
        little-endian; BYTES elements each after its 4-byte little-endian length."""
        if isinstance(self.values, list):
            return b"".join(BYTES_LENGTH.pack(len(v)) + v for v in (s.encode() for s in self.values))
        return np.ascontiguousarray(self.values, dtype="<f4").tobytes()


def classification(probabilities: np.ndarray, k: int, class_names: Sequence[str]) -> list[str]:
    """Triton's classification extension: per image the top k as "probability:index:label", flat."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [f"{row[i]:.6f}:{i}:{class_names[i]}" for row, top in zip(probabilities, order, strict=True) for i in top]


def output_tensors(request: InferRequest, scored: Scored, service: ServedModel) -> list[OutputTensor]:
    """The outputs the request asked for, in its order."""
    probabilities = scored.probabilities
    n, classes = probabilities.shape
    tensors = []
    for output in request.outputs:
        if output.name == OOD_SCORE:
            scores = scored.ood_scores
            assert scores is not None  # only offered when the checkpoint has the statistics
            tensors.append(OutputTensor(output.name, "FP32", [n, 1], scores))
        elif output.classification:
            values = classification(probabilities, output.classification, service.class_names)
            tensors.append(OutputTensor(output.name, "BYTES", [n, output.classification], values))
        else:
            tensors.append(OutputTensor(output.name, "FP32", [n, classes], probabilities))
    return tensors


def _json_tensor(tensor: OutputTensor, binary: bool, blobs: list[bytes]) -> dict[str, Any]:
    """One output: its data inline in JSON, or appended to `blobs` (binary tensor data)."""
    head: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
    if not binary:
        values = tensor.values
        return {**head, "data": values if isinstance(values, list) else values.ravel().tolist()}
    blob = tensor.raw()
    blobs.append(blob)
    return {**head, "parameters": {"binary_data_size": len(blob)}}


def encode(request: InferRequest, scored: Scored, service: ServedModel) -> Reply:
    """The answer: JSON, or with binary outputs the JSON header then the tensors' bytes."""
    blobs: list[bytes] = []
    tensors = output_tensors(request, scored, service)
    outputs = [_json_tensor(t, o.binary, blobs) for t, o in zip(tensors, request.outputs, strict=True)]
    response: dict[str, Any] = {"model_name": service.name, "model_version": service.version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    text = dump_json(response)
    if not blobs:
        return Reply(200, text)
    extra = {"Inference-Header-Content-Length": str(len(text))}
    return Reply(200, b"".join([text, *blobs]), b"application/octet-stream", extra)
