"""`python -m app.reload.validate CHECKPOINT`: load it as a worker would, on the configured device, and
run a warm-up forward pass. If it serves, print `valid` and exit 0; else print the reason on
one line and exit 1.

The supervisor runs `main` in a child it forks before a reload (`supervisor.Validation`), so that
nothing it does (CUDA, torch's thread pools) happens in the process that forks the workers;
`python -m app.reload.validate` runs the same check by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from app.reload.snapshot import VALID


def main(argv: list[str]) -> int:
    from app.served_model import ServedModel
    from app.settings import Settings
    from models import CheckpointError

    if len(argv) != 1:
        print("usage: python -m app.reload.validate CHECKPOINT")
        return 2
    try:
        service = ServedModel.load(Settings(), Path(argv[0]))
        side = service.input_size
        probabilities, _ = service.score(np.zeros((2, 1, side, side), np.float32))
    except CheckpointError as exc:
        print(exc)
        return 1
    except Exception as exc:  # whatever stops a model from serving refuses the reload
        print(f"warm-up failed: {exc!r}")
        return 1
    if probabilities.shape != (2, service.num_classes) or not np.isfinite(probabilities).all():
        print("warm-up failed: the model's output is not finite class probabilities")
        return 1
    print(VALID)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
