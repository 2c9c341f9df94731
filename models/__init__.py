"""Fashion-MNIST models shared by training and serving.

The package map:
- `networks`: the architectures and their registry (`ARCHITECTURES`), `build_model`, and
  `for_inference` (the served copy of a model).
- `preprocessing`: `preprocess_image`, the only image -> model input code, and `normalize`,
  its last step, which training applies to the data set.
- `checkpoint`: `save_checkpoint` and `load_checkpoint` (format v1 and the course's format).
- `trust`: calibrated probabilities and the out-of-distribution score and verdict.
- `saliency`: SmoothGrad saliency maps, on the checkpoint's own model.
- `served_form`: the form a checkpoint is served in (fp32 torch, or its int8 ONNX graph made by
  `python -m training optimize`), chosen and checked at load (`LoadedModel.form`).
- `devices`, `fashion_mnist`: the device rule and the class names.

**Adding a network**: write the nn.Module in `networks.py` (input (N, C, H, W), output
log-probabilities), then one `Architecture` entry in `ARCHITECTURES` declaring: `build`, the
`defaults` of its arguments and `check` (their bounds: a checkpoint's arguments are checked
before anything is built); `input_shape` (what one input is, default (1, 28, 28)); `output_layer`
(the layer producing the outputs, whose input are the features the OOD statistics describe;
default: its last nn.Linear); `channels_last` (train and serve in that memory format); and
`fold_batchnorm` (only where each Conv2d followed by a BatchNorm2d in a Sequential feeds that
BatchNorm alone). Nothing else looks at an architecture's name.

**The OOD method** lives in three places: the score, the verdict and the records'
checks in `trust.py`; reading the records in `checkpoint.py`; fitting them in
`training/fit_trust.py` (run by `python -m training train` and `calibrate`).
"""

from models.checkpoint import CheckpointError, LoadedModel, load_checkpoint, save_checkpoint
from models.devices import resolve_device
from models.fashion_mnist import FASHION_MNIST_CLASSES
from models.networks import (
    ARCHITECTURES,
    Architecture,
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
    "Architecture",
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
