"""Reference figures for the charlm workload (docs/workloads.md), not a timing: what simple
character n-gram models estimated on the train block score on the val and test blocks.

An order-n model predicts a character from the n - 1 before it, with additive smoothing,
P(c | h) = (count(h, c) + alpha) / (count(h) + alpha * V), V the vocabulary of the data set
(the train block's characters and <unk>); alpha is chosen on the val block from a small grid.
Every character of a block after its first n - 1 is scored; the figures are bits per character.

    python benchmarks/charlm_baselines.py [--val-fraction 0.05] [--test-fraction 0.05]
"""

from __future__ import annotations

import argparse
import math
import platform

import numpy as np

from gradalign.data import charlm

ALPHAS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def contexts(tokens: np.ndarray, order: int, vocabulary: int) -> np.ndarray:
    """The id of the n - 1 characters before each scored position (0 for a unigram model)."""
    ids = np.zeros(len(tokens) - order + 1, dtype=np.int64)
    for k in range(order - 1):
        ids = ids * vocabulary + tokens[k : len(tokens) - order + 1 + k]
    return ids


def bits_per_char(
    train: np.ndarray, block: np.ndarray, order: int, vocabulary: int, alpha: float
) -> float:
    """Mean -log2 P(c | h) over ``block`` of the order-``order`` model counted on ``train``."""
    size = vocabulary ** (order - 1)
    joint = np.bincount(
        contexts(train, order, vocabulary) * vocabulary + train[order - 1 :],
        minlength=size * vocabulary,
    )
    history = joint.reshape(size, vocabulary).sum(axis=1)
    h, c = contexts(block, order, vocabulary), block[order - 1 :]
    p = (joint[h * vocabulary + c] + alpha) / (history[h] + alpha * vocabulary)
    return float(-np.log2(p).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    args = parser.parse_args()
    text = charlm.corpus()
    blocks = charlm.blocks(text, val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    vocab = charlm.vocabulary(blocks[0])
    train, val, test = (charlm.encode(block, vocab) for block in blocks)
    vocabulary = len(vocab) + 1
    print(
        f"Python {platform.python_version()}: {len(text)} characters, blocks "
        f"{len(train)}/{len(val)}/{len(test)}, vocabulary {vocabulary} (with <unk>); "
        f"uniform {math.log2(vocabulary):.3f} bits/char"
    )
    print(f"{'model':<10}{'alpha':>8}{'val bits/char':>15}{'test bits/char':>16}")
    for order, name in ((1, "unigram"), (2, "bigram"), (3, "trigram"), (4, "4-gram")):
        alpha = min(ALPHAS, key=lambda a: bits_per_char(train, val, order, vocabulary, a))
        scores = [bits_per_char(train, b, order, vocabulary, alpha) for b in (val, test)]
        print(f"{name:<10}{alpha:>8}{scores[0]:>15.3f}{scores[1]:>16.3f}")


if __name__ == "__main__":
    main()
