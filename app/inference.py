"""What an inference request is to the core, whatever its protocol: the `Call` an adapter makes,
its parser's `Parsed` result, and the `Answer` it gets back (`app.dataplane.DataPlane.run`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.served_model import Pending, Scored, ServedModel

T = TypeVar("T")


@dataclass(slots=True)
class Call:
    """One inference request as every protocol hands it to the core."""

    key: bytes | None = None  # the caller's API key, as sent (None: none sent)
    timeout_s: float | None = None  # the client's timeout known before its body
    model: str | None = None  # None: the default model
    version: str | None = None  # None: the model's default version


@dataclass(slots=True)
class Parsed(Generic[T]):
    """What an adapter's parser makes of a request for one model: its model input (decoded, or a
    decoder the inference thread runs), the protocol's own request (for encoding), the encoded
    size (large ones decode in a thread), and a timeout the body itself carries."""

    input: Pending
    request: T
    encoded_bytes: int = 0
    timeout_s: float | None = None


@dataclass(slots=True)
class Answer(Generic[T]):
    """The version that answered, its scores, and the adapter's parsed request."""

    model: ServedModel
    scored: Scored
    request: T


Parser = Callable[[ServedModel], Awaitable[Parsed[T]]]
