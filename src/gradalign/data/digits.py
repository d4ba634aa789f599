"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; read from the package,
never downloaded), split stratified into train/val/test.

The images are cached in ``cache_dir`` under the installed scikit-learn's version, because
importing scikit-learn (it imports SciPy and pandas) costs seconds and a cache hit needs none of
it.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from gradalign.checks import fraction
from gradalign.data.npz import write_npz_atomically
from gradalign.data.splits import Splits, stratified_parts

N_IMAGES, SIDE = 1797, 8


def load_digits(
    *, val_fraction: float, test_fraction: float, split_seed: int, cache_dir: str | os.PathLike
) -> Splits:
    """The digits as (1, 8, 8) float32 images with pixels scaled from 0..16 to [0, 1].

    ``val_fraction`` and ``test_fraction`` of each class (of all 1797 images) become the val and
    test sets, the rest the training set, chosen by a numpy generator seeded with ``split_seed``;
    each split keeps the data set's order.
    """
    fractions = [
        fraction("dataset.val_fraction", val_fraction),
        fraction("dataset.test_fraction", test_fraction),
    ]
    images, labels = _images_and_labels(Path(cache_dir))
    x = (images / 16.0).astype(np.float32)[:, np.newaxis]
    val, test, train = stratified_parts(
        labels,
        fractions,
        split_seed=split_seed,
        what="[dataset.val_fraction, dataset.test_fraction]",
    )
    tensors = [torch.from_numpy(array[idx]) for idx in (train, val, test) for array in (x, labels)]
    return Splits(*tensors, n_classes=int(labels.max()) + 1)


def _images_and_labels(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float64 pixels in 0..16 and int64 labels: cached, or from scikit-learn."""
    path = cache_dir / f"digits-sklearn-{importlib.metadata.version('scikit-learn')}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as npz:
                images, labels = npz["images"], npz["labels"]
            if images.shape != (N_IMAGES, SIDE, SIDE) or labels.shape != (N_IMAGES,):
                raise ValueError(f"unexpected shapes {images.shape}/{labels.shape}")
            return images, labels
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
            warnings.warn(
                f"ignoring unusable digits cache {path} ({error}); reading scikit-learn's",
                RuntimeWarning,
                stacklevel=3,
            )
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images, labels = bunch.images.astype(np.float64), bunch.target.astype(np.int64)
    write_npz_atomically(path, images=images, labels=labels)
    return images, labels
