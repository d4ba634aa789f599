"""A character-level language-modelling corpus that ships with Python: ``pydoc_data.topics``.

The corpus is the text of the topics (about 465k characters of English documentation in Python
3.11), joined in sorted key order. It is cut into three contiguous blocks: train (the first
characters), val, then test (the last ones). The vocabulary is the train block's characters in
code-point order, with id 0 for any character the train block lacks (``<unk>``). Examples are
windows of ``context`` token ids; a window's targets are the next characters, the window shifted
by one. Windows start every ``train_stride`` characters in the train block and every
``eval_stride`` in the val and test blocks.

The text is that of the running Python: another Python version has other topics, so results are
comparable only within one version (the corpus's size and version are in docs/workloads.md).
"""

from __future__ import annotations

import numpy as np
import torch

from gradalign.checks import fraction, positive_int
from gradalign.data.splits import Splits

UNKNOWN = 0  # the id of a character outside the train block's vocabulary


def corpus() -> str:
    """The pydoc topics of the running Python, joined in sorted key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def blocks(text: str, *, val_fraction: float, test_fraction: float) -> tuple[str, str, str]:
    """``text`` cut into contiguous train, val and test blocks; val and test have
    round(fraction * len(text)) characters each, train the rest, in that order."""
    n_val, n_test = round(val_fraction * len(text)), round(test_fraction * len(text))
    n_train = len(text) - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(
            f"dataset.val_fraction={val_fraction!r} and dataset.test_fraction={test_fraction!r} "
            f"leave an empty block of {len(text)} characters (train {n_train}, val {n_val}, "
            f"test {n_test})"
        )
    return text[:n_train], text[n_train : n_train + n_val], text[n_train + n_val :]


def vocabulary(train: str) -> str:
    """The distinct characters of ``train`` in code-point order; character i has id i + 1."""
    return "".join(sorted(set(train)))


def encode(text: str, vocab: str) -> np.ndarray:
    """int64 ids of ``text``'s characters in ``vocab`` (i + 1 for vocab[i]), UNKNOWN if absent."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    known = np.frombuffer(vocab.encode("utf-32-le"), dtype="<u4")
    position = np.minimum(np.searchsorted(known, codes), len(known) - 1)
    return np.where(known[position] == codes, position + 1, UNKNOWN).astype(np.int64)


def windows(tokens: np.ndarray, *, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``tokens[s : s + context]`` and targets ``tokens[s + 1 : s + context + 1]`` for
    s = 0, stride, 2 * stride, ... while the targets fit (none if len(tokens) <= context)."""
    starts = np.arange(0, len(tokens) - context, stride)
    offsets = starts[:, np.newaxis] + np.arange(context)
    return tokens[offsets], tokens[offsets + 1]


def load_charlm(
    *,
    context: int,
    train_stride: int,
    eval_stride: int,
    val_fraction: float,
    test_fraction: float,
) -> Splits:
    """Splits of (N, context) int64 windows and their (N, context) next-character targets;
    ``n_classes`` is the vocabulary size (the train block's characters + ``<unk>``)."""
    positive_int("dataset.context", context)
    positive_int("dataset.train_stride", train_stride)
    positive_int("dataset.eval_stride", eval_stride)
    fraction("dataset.val_fraction", val_fraction)
    fraction("dataset.test_fraction", test_fraction)
    train, val, test = blocks(corpus(), val_fraction=val_fraction, test_fraction=test_fraction)
    named = {"train": train, "val": val, "test": test}
    for what, block in named.items():
        if len(block) <= context:
            raise ValueError(
                f"dataset.context={context} is invalid: the {what} block has {len(block)} "
                "characters, fewer than context + 1"
            )
    vocab = vocabulary(train)
    parts = []
    for block, stride in ((train, train_stride), (val, eval_stride), (test, eval_stride)):
        x, y = windows(encode(block, vocab), context=context, stride=stride)
        parts += [torch.from_numpy(x), torch.from_numpy(y)]
    return Splits(*parts, n_classes=len(vocab) + 1)
