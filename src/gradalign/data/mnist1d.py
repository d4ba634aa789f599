"""MNIST-1D: local generation, an on-disk cache, and fixed train/val/test splits as tensors.

The data is always generated with ``mnist1d.data.make_dataset`` (never downloaded) and cached in
``cache_dir``. The cache file name is a hash of every generation argument the caller sets plus the
installed mnist1d version (which fixes the defaults of the others), so ``shuffle_seq`` and every
other argument select their own file; mnist1d's own cache ignores ``shuffle_seq``. Resolving the
defaults themselves would mean importing mnist1d, which imports matplotlib and scipy, on every
cache hit; the import happens only when the data must be generated.

The validation split is carved from mnist1d's train set (a fixed, stratified fraction of each
class); the test set is returned untouched, for reporting only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradalign.checks import fraction, is_int
from gradalign.data.npz import write_npz_atomically
from gradalign.data.splits import Splits, carve_validation

# Names of mnist1d's generation arguments (the keys of get_dataset_args() except the download
# `url`). Only the names live here; their defaults come from mnist1d at generation time.
GENERATION_KEYS = (
    "num_samples",
    "train_split",
    "template_len",
    "padding",
    "scale_coeff",
    "max_translation",
    "corr_noise_scale",
    "iid_noise_scale",
    "shear_scale",
    "shuffle_seq",
    "final_seq_length",
    "seed",
)
# Bump when the layout of the cache file changes, so old files are not read as new ones.
_CACHE_FORMAT = 1
_ARRAY_KEYS = ("x", "y", "x_test", "y_test")
MIN_SAMPLES = 10  # one example of each class
VALIDATIONS = ("carved", "test")


def load_mnist1d(
    generation: Mapping[str, Any],
    *,
    val_fraction: float,
    split_seed: int,
    cache_dir: str | os.PathLike,
    validation: str = "carved",
) -> Splits:
    """Load (generating and caching on first use) mnist1d and split it into train/val/test.

    ``generation`` overrides mnist1d's generation arguments (see ``GENERATION_KEYS``); unset keys
    take mnist1d's defaults. With ``validation="carved"`` (the sound protocol) ``val_fraction`` of
    each class of the mnist1d train set, chosen by a numpy generator seeded with ``split_seed``,
    becomes the validation set. With ``validation="test"`` (the research note's protocol) the
    whole train set trains and the test set also serves as the validation set, so whatever is
    selected on validation loss is selected on the test set; the splits say so
    (``Splits.val_is_test``).
    """
    if validation not in VALIDATIONS:
        raise ValueError(
            f"dataset.validation={validation!r} is invalid: must be one of {list(VALIDATIONS)}"
        )
    fraction("dataset.val_fraction", val_fraction)
    overrides = _plain_overrides(generation)
    key = _cache_key(overrides)
    path = Path(cache_dir) / f"mnist1d-{key[:16]}.npz"
    arrays = _read_cache(path, key)
    if arrays is None:
        arrays = _generate(overrides)
        # the key, and the overrides for provenance, beside the arrays
        generation = np.array(json.dumps(overrides))
        write_npz_atomically(path, key=np.array(key), generation=generation, **arrays)
    n_classes = 1 + int(max(arrays["y"].max(), arrays["y_test"].max()))
    if validation == "test":  # trains on all of the train set, validates on the test set
        x, y, x_test, y_test = (torch.from_numpy(arrays[name]) for name in _ARRAY_KEYS)
        return Splits(x, y, x_test, y_test, x_test, y_test, n_classes, val_is_test=True)
    return carve_validation(
        arrays["x"],
        arrays["y"],
        arrays["x_test"],
        arrays["y_test"],
        val_fraction=val_fraction,
        split_seed=split_seed,
        n_classes=n_classes,
    )


def _plain_overrides(generation: Mapping[str, Any]) -> dict[str, Any]:
    """Check the keys and turn the values (possibly OmegaConf containers) into JSON values."""
    unknown = sorted(set(generation) - set(GENERATION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown mnist1d generation argument(s) {unknown}; allowed: {list(GENERATION_KEYS)}"
        )
    overrides = {}
    for name, value in generation.items():
        if isinstance(value, Sequence) and not isinstance(value, str):
            value = list(value)
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(
                f"mnist1d generation argument {name}={value!r} is not a plain value"
            ) from None
        overrides[name] = value
    if "num_samples" in overrides:
        n = overrides["num_samples"]
        if not (is_int(n) and n >= MIN_SAMPLES):
            raise ValueError(
                f"dataset.generation.num_samples={n!r} is invalid: must be an integer >= "
                f"{MIN_SAMPLES} (mnist1d makes num_samples // 10 examples of each of its 10 "
                "classes)"
            )
    if "train_split" in overrides:
        fraction("dataset.generation.train_split", overrides["train_split"])
    return overrides


def _cache_key(overrides: Mapping[str, Any]) -> str:
    """Hash of the generation arguments, the mnist1d version and the cache file layout."""
    identity = {
        "format": _CACHE_FORMAT,
        "mnist1d": importlib.metadata.version("mnist1d"),
        "generation": overrides,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _generate(overrides: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Generate the raw mnist1d train/test arrays with ``make_dataset`` (no download).

    mnist1d seeds Python's and numpy's global generators; their states are restored afterwards
    so that a cache miss leaves the process in the same state as a cache hit.
    """
    os.environ.setdefault("MPLBACKEND", "Agg")  # mnist1d imports matplotlib.pyplot
    import mnist1d.data

    args = mnist1d.data.get_dataset_args(as_dict=True)
    missing = sorted(set(GENERATION_KEYS) - set(args))
    if missing:
        raise RuntimeError(f"installed mnist1d lacks generation arguments {missing}")
    args.update(overrides)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = mnist1d.data.make_dataset(mnist1d.utils.ObjectView(args))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """Return the cached arrays, or None if absent; warn and return None if the file is bad."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in _ARRAY_KEYS}
            stored_key = str(npz["key"])
        _check_arrays(arrays)
        if stored_key != key:
            raise ValueError("its key does not match the generation arguments")
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
        warnings.warn(
            f"ignoring unusable mnist1d cache {path} ({error}); regenerating",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return arrays


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError unless the arrays have the shapes and dtypes of a generated dataset."""
    for x_name, y_name in (("x", "y"), ("x_test", "y_test")):
        x, y = arrays[x_name], arrays[y_name]
        if x.dtype != np.float32 or y.dtype != np.int64:
            raise ValueError(f"unexpected dtypes {x.dtype}/{y.dtype} for {x_name}/{y_name}")
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            raise ValueError(f"unexpected shapes {x.shape}/{y.shape} for {x_name}/{y_name}")
    if arrays["x"].shape[1] != arrays["x_test"].shape[1]:
        raise ValueError("train and test sequence lengths differ")
