"""The v2 inference operations in /openapi.json: plain ASGI, so FastAPI does not see them."""

from __future__ import annotations

from typing import Any


def openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the inference operations (plain ASGI, so FastAPI does not see them) to the schema."""
    for path, version in (("/v2/models/{model}/infer", False), ("/v2/models/{model}/versions/{version}/infer", True)):
        parameters = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
        if version:
            parameters.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
        operation_id = "v2_infer_version" if version else "v2_infer"
        schema["paths"][path] = {"post": {**INFER_OPERATION, "parameters": parameters, "operationId": operation_id}}
    return schema


def _error(description: str) -> dict[str, Any]:
    error_schema = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    return {"description": description, "content": {"application/json": {"schema": error_schema}}}


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array", "items": {}},
    },
}

INFER_OPERATION: dict[str, Any] = {
    "tags": ["v2 (Open Inference Protocol)"],
    "summary": "Infer (v2)",
    "description": (
        "One input, `input`: FP32 `[N, 1, 28, 28]`, `[N, 28, 28]` or `[N, 784]` normalized as the checkpoint's "
        "preprocessing says; UINT8 `[N, 28, 28]` or `[N, 1, 28, 28]` raw grayscale pixels; or BYTES `[N]` "
        "encoded image files (base64 strings in JSON), decoded as /predict decodes them. Output `probabilities` "
        "FP32 `[N, classes]`, or with `parameters.classification: k` BYTES `[N, k]` of "
        '`"probability:index:label"`. The binary tensor data extension is accepted '
        "(`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`, `binary_data_output`)."
    ),
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "the outputs (JSON; with binary outputs, the JSON header then the tensors' bytes)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "400": _error("malformed JSON, wrong shape or datatype, data not matching its shape, undecodable image"),
        "404": _error("unknown model or version"),
        "405": _error("method not allowed"),
        "408": _error("the body did not arrive in time"),
        "413": _error("over the body limit or FASHION_SERVE_V2_MAX_IMAGES images"),
        "504": _error("the deadline (`timeout` parameter, X-Request-Timeout, the server's default) passed first"),
        "503": _error("not ready, draining, busy or out of accelerator memory; see Retry-After"),
    },
}
