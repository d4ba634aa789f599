"""Train/val/test tensors, the stratified carve-out of a validation set from a train set, and a
stratified split of one labelled array into parts."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gradalign.checks import fraction


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train/val/test inputs ``x`` (one example per row, any trailing shape) and int64 targets
    ``y``: labels of shape (N,), or one target per position, (N, T), for a sequence model (a
    language model's next tokens); ``n_classes`` is the number of classes the targets index."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    val_is_test: bool = False  # the test set is also the validation set: selection sees it

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. (40,) for the standard mnist1d."""
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> Splits:
        """The same splits with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def carve_validation(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    val_fraction: float,
    split_seed: int,
    n_classes: int,
) -> Splits:
    """Splits whose validation set is carved from the train arrays: round(val_fraction * count)
    of each class, chosen by a numpy generator seeded with ``split_seed``; train and val keep
    the data order, the test arrays are returned untouched (for reporting only)."""
    fraction("dataset.val_fraction", val_fraction)
    rng = np.random.default_rng(split_seed)
    val_parts = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        n_val = round(val_fraction * len(members))
        val_parts.append(rng.choice(members, size=n_val, replace=False))
    val_idx = np.sort(np.concatenate(val_parts))
    if len(val_idx) == 0 or len(val_idx) == len(y):
        raise ValueError(
            f"dataset.val_fraction={val_fraction!r} leaves an empty train or val split of "
            f"{len(y)} samples"
        )
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val_idx] = True
    return Splits(
        x_train=torch.from_numpy(x[~is_val]),
        y_train=torch.from_numpy(y[~is_val]),
        x_val=torch.from_numpy(x[is_val]),
        y_val=torch.from_numpy(y[is_val]),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        n_classes=n_classes,
    )


def stratified_parts(
    y: np.ndarray, fractions: list[float], *, split_seed: int, what: str
) -> list[np.ndarray]:
    """Sorted indices of ``len(fractions) + 1`` disjoint parts that together cover ``y``: part i
    holds round(fractions[i] * count) of each class, the last part the rest. One permutation of
    each class's members, drawn by a numpy generator seeded with ``split_seed``, is cut in that
    order. ``what`` names the fractions' settings in the refusal of fractions that leave a part
    empty or do not leave room for the last part."""
    if sum(fractions) >= 1:
        raise ValueError(f"{what}={fractions!r} is invalid: must add up to less than 1")
    rng = np.random.default_rng(split_seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        ends = np.cumsum([round(f * len(members)) for f in fractions])
        for part, chunk in zip(parts, np.split(members, ends), strict=True):
            part.append(chunk)
    indices = [np.sort(np.concatenate(part)) for part in parts]
    if any(len(part) == 0 for part in indices):
        sizes = [len(part) for part in indices]
        raise ValueError(f"{what}={fractions!r} leaves an empty part of {len(y)} samples: {sizes}")
    return indices
