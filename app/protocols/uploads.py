"""The uploads of /predict and /explain: a body of multipart parts named `file`, or one image as
the body, checked against the content type, the multipart structure and the part limits (the
protocol's rule; `app.http.multipart` is the parser)."""

from __future__ import annotations

from app.decoding import ALLOWED_CONTENT_TYPES
from app.errors import ServeError
from app.http.multipart import parse_multipart

FIELD = "file"  # the multipart part name that carries images
IMAGE_TYPES = sorted(t for t in ALLOWED_CONTENT_TYPES if t.startswith("image/"))


def split_body(body: bytes, content_type: str, max_files: int) -> list[tuple[str | None, bytes, str | None]]:
    """A /predict body -> its images as (filename, bytes, declared type); ServeError for a body we refuse."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        parts = parse_multipart(body, content_type, FIELD, max_files)
        if not parts:
            raise missing_file()
        return [(p.filename, bytes(p.data), p.content_type) for p in parts]
    if media_type.startswith("image/"):
        return [(None, body, media_type)]
    if not media_type and not body:
        raise missing_file()
    raise ServeError(
        415,
        f"unsupported content type {media_type or '(none)'!r}: send multipart/form-data "
        f"with '{FIELD}' parts, or one image as the body with an image/* content type",
    )


def missing_file() -> ServeError:
    return ServeError(422, f"no '{FIELD}' part: send images as multipart/form-data parts named '{FIELD}'")
