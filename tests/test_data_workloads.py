"""The workloads' data sets: scikit-learn's digits (stratified, disjoint splits; a cache that
spares the scikit-learn import) and the pydoc character corpus (contiguous blocks, windows
whose targets are the next characters, a train-block vocabulary with <unk>)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from gradalign.data import charlm
from gradalign.data.charlm import UNKNOWN, load_charlm
from gradalign.data.digits import load_digits
from gradalign.data.splits import stratified_parts


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


def digits(cache_dir, val_fraction=0.2, test_fraction=0.2, split_seed=0):
    return load_digits(
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        cache_dir=cache_dir,
    )


def sklearn_digits():
    from sklearn.datasets import load_digits as sklearn_load

    bunch = sklearn_load()
    return bunch.images, bunch.target


def rows(x):
    """The multiset of images, as sorted bytes."""
    return sorted(image.numpy().tobytes() for image in x)


def test_digits_are_the_1797_images_scaled_to_the_unit_interval(cache):
    splits = digits(cache)
    images, target = sklearn_digits()
    assert splits.input_shape == (1, 8, 8) and splits.n_classes == 10
    assert splits.x_train.dtype == torch.float32 and splits.y_train.dtype == torch.int64
    x = torch.cat([splits.x_train, splits.x_val, splits.x_test])
    y = torch.cat([splits.y_train, splits.y_val, splits.y_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    expected = torch.from_numpy((images / 16.0).astype(np.float32))[:, None]
    assert rows(x) == rows(expected)  # the splits together are the data set, each image once
    assert sorted(y.tolist()) == sorted(target.tolist())


def test_digits_splits_are_stratified(cache):
    splits = digits(cache, val_fraction=0.15, test_fraction=0.25)
    _, target = sklearn_digits()
    for label in range(10):
        count = int((target == label).sum())
        assert int((splits.y_val == label).sum()) == round(0.15 * count)
        assert int((splits.y_test == label).sum()) == round(0.25 * count)
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 1797


def test_stratified_parts_are_disjoint_sorted_and_cover_the_labels():
    y = np.repeat(np.arange(4), [10, 7, 3, 20])
    parts = stratified_parts(y, [0.2, 0.3], split_seed=1, what="f")
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    for part in parts:
        assert np.all(np.diff(part) > 0)
    for label, count in enumerate([10, 7, 3, 20]):
        assert [int((y[p] == label).sum()) for p in parts[:2]] == [
            round(0.2 * count),
            round(0.3 * count),
        ]


def test_digits_split_seed_changes_the_split_and_same_seed_repeats_it(cache):
    a, b, c = digits(cache), digits(cache), digits(cache, split_seed=1)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_test, c.x_test)


@pytest.mark.parametrize(
    "fractions,needle",
    [
        ((0.5, 0.5), "must add up to less than 1"),
        ((0.0, 0.2), "dataset.val_fraction=0.0 is invalid"),
        ((0.2, 1.0), "dataset.test_fraction=1.0 is invalid"),
        ((0.6, 0.3999), "leaves an empty part of 1797 samples"),
    ],
)
def test_digits_refuse_fractions_that_leave_no_split(cache, fractions, needle):
    with pytest.raises(ValueError, match="invalid|empty|add up") as info:
        digits(cache, *fractions)
    assert needle in str(info.value)


def test_digits_cache_hit_does_not_import_sklearn(cache):
    digits(cache)
    code = (
        "import sys; from gradalign.data.digits import load_digits; "
        "load_digits(val_fraction=0.2, test_fraction=0.2, split_seed=0, "
        f"cache_dir={str(cache)!r}); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_a_bad_digits_cache_is_replaced(tmp_path, cache):
    original = digits(cache)
    digits(tmp_path)
    (path,) = tmp_path.glob("digits-*.npz")
    path.write_bytes(b"not an npz file")
    with pytest.warns(RuntimeWarning, match="ignoring unusable digits cache"):
        again = digits(tmp_path)
    assert torch.equal(again.x_train, original.x_train)
    assert np.load(path)["images"].shape == (1797, 8, 8)  # rewritten


# charlm


CHARLM = {"context": 64, "train_stride": 64, "eval_stride": 64}


@pytest.fixture(scope="module")
def corpus():
    return charlm.corpus()


@pytest.fixture(scope="module")
def lm():
    return load_charlm(**CHARLM, val_fraction=0.05, test_fraction=0.05)


def decode(ids, vocab):
    return "".join("\0" if i == UNKNOWN else vocab[i - 1] for i in ids.tolist())


def test_the_corpus_is_the_pydoc_topics_in_sorted_key_order(corpus):
    from pydoc_data.topics import topics

    keys = sorted(topics)
    assert corpus.startswith(topics[keys[0]]) and corpus.endswith(topics[keys[-1]])
    assert len(corpus) == sum(len(text) for text in topics.values()) > 100_000


def test_blocks_are_contiguous_disjoint_and_in_order(corpus):
    train, val, test = charlm.blocks(corpus, val_fraction=0.05, test_fraction=0.1)
    assert train + val + test == corpus
    assert (len(val), len(test)) == (round(0.05 * len(corpus)), round(0.1 * len(corpus)))


def test_windows_targets_are_the_next_characters_of_their_block(corpus, lm):
    train, val, test = charlm.blocks(corpus, val_fraction=0.05, test_fraction=0.05)
    vocab = charlm.vocabulary(train)
    assert lm.n_classes == len(vocab) + 1 and lm.input_shape == (64,)
    for x, y, block in [
        (lm.x_train, lm.y_train, train),
        (lm.x_val, lm.y_val, val),
        (lm.x_test, lm.y_test, test),
    ]:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        assert len(x) == (len(block) - 1) // 64  # windows every 64 characters, targets fitting
        for i in (0, 1, len(x) - 1):
            start = 64 * i
            assert decode(x[i], vocab) == block[start : start + 64].translate(
                {ord(c): "\0" for c in set(block) - set(vocab)}
            )
            assert decode(y[i], vocab) == decode(x[i], vocab)[1:] + decode(
                torch.tensor([charlm.encode(block[start + 64], vocab)[0]]), vocab
            )
        torch.testing.assert_close(x[:, 1:], y[:, :-1])


def test_vocabulary_is_the_train_blocks_characters_and_others_are_unknown():
    vocab = charlm.vocabulary("banana")
    assert vocab == "abn"
    assert charlm.encode("cabn!", vocab).tolist() == [UNKNOWN, 1, 2, 3, UNKNOWN]
    assert charlm.encode("", vocab).tolist() == []


def test_eval_stride_and_train_stride_set_the_windows(corpus):
    lm = load_charlm(
        context=32, train_stride=100, eval_stride=16, val_fraction=0.05, test_fraction=0.05
    )
    train, val, _ = charlm.blocks(corpus, val_fraction=0.05, test_fraction=0.05)
    assert len(lm.x_train) == len(range(0, len(train) - 32, 100))
    assert len(lm.x_val) == len(range(0, len(val) - 32, 16))
    torch.testing.assert_close(lm.x_val[1, :16], lm.x_val[0, 16:])  # overlapping by 16


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"context": 0}, "dataset.context=0 is invalid"),
        ({"train_stride": 0}, "dataset.train_stride=0 is invalid"),
        ({"eval_stride": 1.5}, "dataset.eval_stride=1.5 is invalid"),
        ({"val_fraction": 0.0}, "dataset.val_fraction=0.0 is invalid"),
        ({"context": 30_000}, "the val block has 23248 characters, fewer than context + 1"),
        ({"context": 500_000}, "the train block has"),
        ({"test_fraction": 1e-7}, "leave an empty block"),
    ],
)
def test_charlm_refuses_bad_settings_naming_them(overrides, needle):
    settings = {**CHARLM, "val_fraction": 0.05, "test_fraction": 0.05, **overrides}
    with pytest.raises(ValueError) as info:
        load_charlm(**settings)
    assert needle in str(info.value)
