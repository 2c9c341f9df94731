"""Forward-pass forms of one checkpoint, side by side: microseconds per image and test accuracy.

    python -m bench.forms [--checkpoint models/fashion_cnn.pt] [--no-compile]

One thread, in-process, best of 5 runs per batch size. The forms: the served fp32 torch model
(BatchNorm folded, channels-last where the architecture says), bf16 weights, bf16 autocast,
`torch.compile` (inductor; its compile time is printed), ONNX Runtime fp32 (the exported graph)
and int8 (the checkpoint's `served_form` record, else made here). Each gives log-probabilities and
the OOD features in one pass, as the service needs. Accuracy is on the 10,000 test images when
Fashion-MNIST is installed. This is how docs/performance.md chose the served form.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.micro import best_us
from bench.server import ROOT
from models import LoadedModel, for_inference, load_checkpoint
from models.served_form import ONNX_INT8, TORCH_FP32, OnnxForm
from models.trust import forward_with_features

BATCHES = (1, 16, 32)
Run = Callable[[torch.Tensor], object]


def _torch_forms(loaded: LoadedModel, compile_too: bool) -> dict[str, Run]:
    served = for_inference(loaded.model, loaded.architecture)
    layer = loaded.architecture.output_layer(served)
    bf16 = for_inference(loaded.model, loaded.architecture).to(torch.bfloat16)
    bf16_layer = loaded.architecture.output_layer(bf16)

    def autocast(x: torch.Tensor) -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward_with_features(served, x, layer)

    forms: dict[str, Run] = {
        TORCH_FP32: lambda x: forward_with_features(served, x, layer),
        "torch bf16 weights": lambda x: forward_with_features(bf16, x.to(torch.bfloat16), bf16_layer),
        "torch bf16 autocast": autocast,
    }
    if compile_too:
        from training.optimize import _WithFeatures

        compiled = torch.compile(_WithFeatures(served, layer).eval(), dynamic=True)
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in BATCHES:
                compiled(torch.zeros(batch, *loaded.architecture.input_shape))
        print(f"torch.compile: {time.perf_counter() - started:.1f} s to compile for batches {BATCHES}")
        forms["torch.compile fp32"] = compiled
    return forms


def _onnx_forms(loaded: LoadedModel) -> dict[str, Run]:
    from training.optimize import export_onnx, make_record

    forms: dict[str, Run] = {"onnxruntime fp32": OnnxForm(export_onnx(loaded), threads=1)}
    record = loaded.served_form
    if record is None:
        shape = loaded.architecture.input_shape
        rng = np.random.default_rng(0)
        calibration = rng.standard_normal((256, *shape)).astype(np.float32)
        record = make_record(loaded, calibration, np.zeros((1, *shape[1:]), np.uint8))
        print("no served_form in the checkpoint: int8 calibrated on random inputs here (speed only)")
    forms[ONNX_INT8] = OnnxForm(record.graph, threads=1)
    return forms


def _accuracy(run: Run, loaded: LoadedModel) -> float | None:
    try:
        from models.preprocessing import normalize_tensor
        from training.data import load_fashion_mnist

        data = load_fashion_mnist()
    except Exception:  # no data set here: speed only
        return None
    x = normalize_tensor(data.test.images, loaded.preprocess).unsqueeze(1)
    with torch.inference_mode():
        log_ps = torch.cat([torch.as_tensor(run(b)[0]).float() for b in x.split(500)])  # type: ignore[index]
    return 100 * float((log_ps.argmax(1) == data.test.labels).double().mean())


@torch.inference_mode()
def _per_image_us(run: Run, x: torch.Tensor) -> float:
    def once(_i: int) -> object:
        return run(x)

    return best_us(once, max(5, 2000 // len(x))) / len(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forms", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "fashion_cnn.pt")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes a while)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_checkpoint(args.checkpoint)
    forms = {**_torch_forms(loaded, not args.no_compile), **_onnx_forms(loaded)}
    rng = np.random.default_rng(0)
    shape = loaded.architecture.input_shape
    inputs = {b: torch.from_numpy(rng.standard_normal((b, *shape), np.float32)) for b in BATCHES}
    print(f"{args.checkpoint.name}, torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, 1 thread")
    print(f"{'form':<22} " + " ".join(f"{'b=' + str(b) + ' us/img':>13}" for b in BATCHES) + f" {'test acc %':>10}")
    for name, run in forms.items():
        micros = [_per_image_us(run, inputs[b]) for b in BATCHES]
        accuracy = _accuracy(run, loaded)
        shown = "" if accuracy is None else f"{accuracy:.2f}"
        print(f"{name:<22} " + " ".join(f"{m:13.1f}" for m in micros) + f" {shown:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
