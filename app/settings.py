"""Service configuration, from `FASHION_SERVE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "fashion_cnn.pt"
STATIC_DIR = Path(__file__).resolve().parent / "static"  # Swagger UI and the page, served from the package


class Settings(BaseSettings):
    """Every knob of the service; the README's configuration table lists them with their defaults."""

    model_config = SettingsConfigDict(env_prefix="FASHION_SERVE_", frozen=True, populate_by_name=True)

    checkpoint: Path = BUNDLED_CHECKPOINT
    device: str = "auto"
    # auto: the checkpoint's int8 form where sound. FASHION_SERVE_BACKEND, its name before, still works.
    served_form: Literal["auto", "torch-fp32", "onnx-int8"] = Field(
        "auto", validation_alias=AliasChoices("FASHION_SERVE_SERVED_FORM", "FASHION_SERVE_BACKEND")
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_files: int = Field(16, ge=1, le=1024)
    max_image_pixels: int = Field(16_777_216, ge=1024, le=89_478_485)
    default_k: int = Field(3, ge=1)
    max_k: int = Field(10, ge=1)
    torch_threads: int = Field(1, ge=1, le=256)
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_batch_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    max_concurrency: int = Field(1024, ge=1)  # a cap on requests in progress; max_queue_delay_s refuses first
    max_queue_delay_s: float = Field(1.0, gt=0, le=60)  # admit while the work ahead would be done within this
    request_timeout_s: float | None = Field(None, gt=0, le=3600)  # None: no server default deadline
    max_connections: int = Field(8192, ge=1)  # per worker; uvicorn refuses every request past it
    body_timeout_s: float = Field(30.0, gt=0)
    shutdown_grace_s: int = Field(8, ge=0)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(8081, ge=0, le=65535)  # the v2 protocol over gRPC, on `host`; 0: off
    workers: int | None = Field(None, ge=1, le=64)  # None: one per CPU this process may use
    keep_alive_s: int = Field(5, ge=1)
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    header_timeout_s: float = Field(10.0, gt=0, le=300)
    api_keys: SecretStr = SecretStr("")  # comma-separated; with api_keys_file, none means no keys needed
    api_keys_file: Path | None = None  # one key per line (Docker and Kubernetes secrets)
    admin_keys: SecretStr = SecretStr("")  # the repository API's keys; none: that API answers 403
    admin_keys_file: Path | None = None
    model_repository: Path | None = None  # DIR/<name>/<version>/<checkpoint>; None: serve `checkpoint` alone
    load_models: str | None = None  # comma-separated: the models loaded at start (default: all)
    default_model: str | None = None  # the model /predict and the page serve (default: the only one)
    max_model_memory_mb: int | None = Field(None, ge=1)  # per worker: a load past it is refused
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # None: the checkpoint's stem
    model_version: str = Field("1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    v2_max_images: int = Field(256, ge=1, le=4096)

    @property
    def served_name(self) -> str:
        """The model's name in every API: FASHION_SERVE_MODEL_NAME, else the checkpoint file's stem."""
        return self.model_name or self.checkpoint.stem

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _checkpoint(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: unset it to serve the bundled checkpoint, or give a path")
        return value

    @model_validator(mode="after")
    def _k_bounds(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")
