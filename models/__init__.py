"""Fashion-MNIST models shared by training and serving: networks, preprocessing, checkpoints."""

from models.checkpoint import CheckpointError, LoadedModel, load_checkpoint, save_checkpoint
from models.devices import resolve_device
from models.fashion_mnist import FASHION_MNIST_CLASSES
from models.networks import (
    ARCHITECTURES,
    Classifier,
    FashionCNN,
    Network,
    build_model,
    for_inference,
    model_args_for,
)
from models.preprocessing import ImageError, PreprocessConfig, normalize, normalize_tensor, preprocess_image

__all__ = [
    "ARCHITECTURES",
    "FASHION_MNIST_CLASSES",
    "CheckpointError",
    "Classifier",
    "FashionCNN",
    "ImageError",
    "LoadedModel",
    "Network",
    "PreprocessConfig",
    "build_model",
    "for_inference",
    "load_checkpoint",
    "model_args_for",
    "normalize",
    "normalize_tensor",
    "preprocess_image",
    "resolve_device",
    "save_checkpoint",
]
