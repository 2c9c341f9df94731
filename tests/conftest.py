from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.helpers import write_tiny_checkpoint

# gRPC off in every app and server the tests start (its fixed default port would be shared by
# all of them and by other runs on the machine); the gRPC tests name a free port.
os.environ["FASHION_SERVE_GRPC_PORT"] = "0"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", metrics={"test_accuracy": 0.5})


@pytest.fixture
def settings(tiny_checkpoint: Path) -> Settings:
    return Settings(checkpoint=tiny_checkpoint, device="cpu")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
