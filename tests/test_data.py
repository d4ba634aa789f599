"""gradalign.data: generation arguments, the on-disk cache, and the train/val/test splits."""

import math
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import gradalign.data.mnist1d as data
from gradalign.data.mnist1d import load_mnist1d

SMALL = {"num_samples": 500}  # 400 train / 100 test: fast to generate


@pytest.fixture
def generate_calls(monkeypatch):
    """Count calls of the generator while still generating the real data."""
    calls = []
    real = data._generate

    def counting(overrides):
        calls.append(dict(overrides))
        return real(overrides)

    monkeypatch.setattr(data, "_generate", counting)
    return calls


def load(cache_dir, generation=SMALL, val_fraction=0.1, split_seed=0):
    return load_mnist1d(
        generation, val_fraction=val_fraction, split_seed=split_seed, cache_dir=cache_dir
    )


def assert_same_splits(a, b):
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_tensors_types_and_shapes(tmp_path):
    splits = load(tmp_path)
    assert splits.x_train.dtype == torch.float32 and splits.y_train.dtype == torch.int64
    n_train, n_val = len(splits.x_train), len(splits.x_val)
    assert n_train + n_val == 400 and abs(n_val - 40) <= 5  # 10 classes, each rounded
    assert splits.x_train.shape[1:] == splits.x_val.shape[1:] == (40,)
    assert splits.x_test.shape == (100, 40) and splits.y_test.shape == (100,)
    assert splits.input_shape == (40,) and splits.n_classes == 10
    moved = splits.to("cpu")
    assert moved.x_val.device.type == "cpu"
    assert_same_splits(splits, moved)


def test_second_load_reuses_cache(tmp_path, generate_calls):
    first = load(tmp_path)
    second = load(tmp_path)
    assert len(generate_calls) == 1
    assert_same_splits(first, second)
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.glob("*.npz")).name]


def test_every_argument_keys_the_cache(tmp_path, generate_calls):
    plain = load(tmp_path, {**SMALL, "shuffle_seq": False})
    shuffled = load(tmp_path, {**SMALL, "shuffle_seq": True})
    assert len(generate_calls) == 2
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert not torch.equal(plain.x_train, shuffled.x_train)
    # Same labels (shuffle_seq permutes positions only), different sequences.
    assert torch.equal(plain.y_train, shuffled.y_train)


def test_sequence_values_key_alike(tmp_path, generate_calls):
    load(tmp_path, {**SMALL, "padding": [36, 60]})
    load(tmp_path, {**SMALL, "padding": (36, 60)})
    assert len(generate_calls) == 1


def write_npz(path, **arrays):
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def corrupt_garbage(path):
    path.write_bytes(b"not a zip file at all" * 10)


def corrupt_wrong_shapes(path):
    write_npz(
        path,
        x=np.zeros((3, 40), np.float32),
        y=np.zeros(2, np.int64),
        x_test=np.zeros((1, 40), np.float32),
        y_test=np.zeros(1, np.int64),
        key="",
    )


def corrupt_missing_key(path):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "y_test"}
    write_npz(path, **arrays)


def corrupt_other_key(path):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["key"] = np.array("0" * 64)
    write_npz(path, **arrays)


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_truncate,
        corrupt_garbage,
        corrupt_wrong_shapes,
        corrupt_missing_key,
        corrupt_other_key,
    ],
)
def test_bad_cache_file_is_regenerated(tmp_path, generate_calls, corrupt):
    original = load(tmp_path)
    (path,) = tmp_path.glob("*.npz")
    corrupt(path)
    with pytest.warns(RuntimeWarning, match="regenerating"):
        regenerated = load(tmp_path)
    assert len(generate_calls) == 2
    assert_same_splits(original, regenerated)
    load(tmp_path)  # the rewritten file is good again: no third generation
    assert len(generate_calls) == 2


def test_validation_split_is_stratified(tmp_path):
    val_fraction = 0.15
    splits = load(tmp_path, val_fraction=val_fraction)
    all_labels = torch.cat([splits.y_train, splits.y_val])
    for label in range(10):
        count = int((all_labels == label).sum())
        n_val = int((splits.y_val == label).sum())
        assert abs(n_val - val_fraction * count) <= 1, (label, n_val, count)


def test_train_and_val_are_disjoint_and_cover_the_train_set(tmp_path):
    splits = load(tmp_path, val_fraction=0.25)
    train_rows = {row.numpy().tobytes() for row in splits.x_train}
    val_rows = {row.numpy().tobytes() for row in splits.x_val}
    assert not train_rows & val_rows
    assert len(train_rows) + len(val_rows) == 400  # 0.8 * 500, all distinct


def test_same_seeds_give_identical_tensors(tmp_path):
    assert_same_splits(load(tmp_path / "a"), load(tmp_path / "b"))


def test_split_seed_changes_the_validation_set(tmp_path):
    a = load(tmp_path, split_seed=0)
    b = load(tmp_path, split_seed=1)
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_val, b.x_val)


def test_generation_leaves_global_rngs_untouched(tmp_path):
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    load(tmp_path)  # a cache miss: mnist1d seeds numpy's global generator internally
    assert np.random.random() == expected


def test_cache_hit_does_not_import_mnist1d(tmp_path):
    load(tmp_path)
    code = (
        "import sys; from gradalign.data.mnist1d import load_mnist1d; "
        f"load_mnist1d({SMALL!r}, val_fraction=0.1, split_seed=0, cache_dir={str(tmp_path)!r}); "
        "print('mnist1d' in sys.modules, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_generation_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_sample") as info:
        load(tmp_path, {"num_sample": 500})
    assert "num_samples" in str(info.value)  # the allowed keys are listed


@pytest.mark.parametrize("val_fraction", [0, 0.0, 1, 1.5, -0.1, math.nan, True, "0.1"])
def test_val_fraction_outside_unit_interval_is_rejected(tmp_path, val_fraction):
    with pytest.raises(ValueError, match="val_fraction") as info:
        load(tmp_path, val_fraction=val_fraction)
    assert repr(val_fraction) in str(info.value)


def test_val_fraction_leaving_empty_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="0.001"):
        load(tmp_path, val_fraction=0.001)


def test_unserialisable_generation_value_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        load(tmp_path, {"seed": object()})


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves neither a partial cache file nor a temporary file."""

    def failing_savez(handle, **arrays):
        handle.write(b"partial")
        raise zipfile.LargeZipFile("disk full")

    monkeypatch.setattr(data.np, "savez", failing_savez)
    with pytest.raises(zipfile.LargeZipFile):
        load(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "generation,needle",
    [
        (
            {"num_samples": 5},
            "dataset.generation.num_samples=5 is invalid: must be an integer >= 10",
        ),
        ({"num_samples": 0}, "num_samples=0"),
        ({"num_samples": 100.5}, "num_samples=100.5"),
        ({"train_split": 1.0}, "dataset.generation.train_split=1.0 is invalid"),
    ],
)
def test_generation_arguments_mnist1d_cannot_use_are_refused_naming_them(
    tmp_path, generate_calls, generation, needle
):
    with pytest.raises(ValueError) as info:
        load(tmp_path, generation)
    assert needle in str(info.value)
    assert generate_calls == []  # refused before generating anything
