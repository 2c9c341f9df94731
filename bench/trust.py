"""What `models.trust.Trust` adds to a forward pass, per batch, on one torch thread.

    python -m bench.trust [--checkpoint models/fashion_cnn.pt ...] [--device cpu]

For batches of 1 and 32, on the served model (the fp32 form `LoadedModel.form` builds, as
`ServedModel` runs it) under inference mode: a plain step (`model(x).exp()`) and the served
step (the form's forward pass, which also returns the penultimate features, then
`Trust.apply`: calibrated probabilities and OOD scores), interleaved, best of 7 rounds; and the
extra math alone (the tempered softmax and the OOD score), timed without the forward pass,
whose run-to-run noise on a shared machine is larger than the math.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from bench.micro import ROOT, best_us
from models import for_inference, load_checkpoint
from models.served_form import TORCH_FP32, ServedForm
from models.trust import Trust, ood_scores

ROUNDS = 7


def measure(
    model: torch.nn.Module, forward: ServedForm, trust: Trust, x: torch.Tensor, sync: Callable[[], None]
) -> tuple[float, ...]:
    """(plain forward us, the served step us, extra math alone us) for one batch."""
    assert trust.ood is not None
    ood, n = trust.ood, 200 if len(x) == 1 else 20
    log_ps, features = forward(x)
    assert features is not None

    def plain(_: int) -> None:
        model(x).exp()
        sync()

    def trusted(_: int) -> None:
        trust.apply(*forward(x))
        sync()

    def extra_math(_: int) -> None:
        torch.softmax(log_ps * 0.8, dim=1)
        ood_scores(features, ood)
        sync()

    # Interleaved rounds, best of each: the two forward passes see the same neighbours.
    rounds = [(best_us(plain, n), best_us(trusted, n)) for _ in range(ROUNDS)]
    return min(r[0] for r in rounds), min(r[1] for r in rounds), best_us(extra_math, 2000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trust", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        default=[ROOT / "models" / "fashion_cnn.pt", ROOT / "models" / "course_network.pt"],
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    print(
        f"{'checkpoint':<22} {'batch':>5} {'plain us':>9} {'trusted us':>10} {'diff us':>9} {'math us':>9} "
        f"{'math/plain':>9}"
    )
    for path in args.checkpoint:
        loaded = load_checkpoint(path, device=args.device)
        if loaded.ood is None or loaded.calibration is None:
            raise SystemExit(f"{path} has no trust records: run `python -m training calibrate {path}`")
        model, trust = for_inference(loaded.model, loaded.architecture), loaded.trust()
        forward = loaded.form(TORCH_FP32)
        for batch in (1, 32):
            with torch.inference_mode():
                x = torch.randn(batch, 1, 28, 28, device=loaded.device)
                plain_us, with_trust, math_us = measure(model, forward, trust, x, sync)
            print(
                f"{Path(path).name:<22} {batch:>5} {plain_us:9.1f} {with_trust:10.1f} {with_trust - plain_us:+9.1f} "
                f"{math_us:9.1f} {100 * math_us / plain_us:8.1f}%"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
