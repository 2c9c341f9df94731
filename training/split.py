"""The train/validation split: one function for training and for the trust commands.

Training records the split's parameters in the checkpoint (`record`); `calibrate` and
`ood-report` rebuild the same split from that record (`SplitPlan.from_record`), so the images a
model was validated on, never trained on, are the ones its temperature and OOD threshold are
fitted on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_SEED = 0
DEFAULT_VAL_SIZE = 5000
MAX_VAL_SHARE = 5  # at most one in this many examples is held out


@dataclass(frozen=True)
class SplitPlan:
    """Which training examples are used (`limit`: the first N; None: all), and how many of them
    (`val_size`, at most a fifth) a permutation seeded with `seed` holds out for validation."""

    seed: int = DEFAULT_SEED
    val_size: int = DEFAULT_VAL_SIZE
    limit: int | None = None

    def indices(self, num_train: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train indices, validation indices) into the full training set of `num_train` examples."""
        used = min(self.limit, num_train) if self.limit else num_train
        val_size = min(self.val_size, used // MAX_VAL_SHARE)
        order = torch.randperm(used, generator=torch.Generator().manual_seed(self.seed))
        return order[val_size:], order[:val_size]

    def record(self) -> dict[str, Any]:
        """The entries of a checkpoint's training record that `from_record` reads back."""
        return {"seed": self.seed, "val_size": self.val_size, "limit": self.limit}

    @classmethod
    def from_record(cls, training: Mapping[str, Any]) -> SplitPlan:
        """The split a checkpoint was trained with. Records written before `limit` was recorded
        give it as train + validation examples (the first N examples were used); a checkpoint
        without a record (the course format) gets the defaults."""
        if "limit" in training:
            limit = None if training["limit"] is None else _count(training, "limit")
            return cls(_count(training, "seed"), _count(training, "val_size"), limit)
        used = _count(training, "train_examples", 0) + _count(training, "val_examples", 0)
        return cls(
            _count(training, "seed", DEFAULT_SEED),
            _count(training, "val_examples", DEFAULT_VAL_SIZE),
            used or None,
        )


def _count(training: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """A non-negative integer entry of a training record."""
    value = training.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"the checkpoint's training record has {key} = {value!r}, not a count")
    return value
