"""The one place a refusal's HTTP status becomes a gRPC status code."""

from __future__ import annotations

import grpc

from app.errors import ServeError

# A message over the size limit never reaches a handler: grpc itself answers RESOURCE_EXHAUSTED
# (the server's max_receive_message_length is FASHION_SERVE_MAX_UPLOAD_BYTES).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # too many images, an image over the pixel limit
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(error: ServeError) -> grpc.StatusCode:
    return CODES.get(error.status, grpc.StatusCode.INTERNAL)
