"""A linear classifier (multinomial logistic regression): the floor every model should beat."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gradalign.checks import positive_int, positive_ints


class Linear(nn.Module):
    """``head``: one affine map from the flattened input to the class logits."""

    def __init__(self, input_shape: Sequence[int], n_classes: int) -> None:
        super().__init__()
        features = math.prod(positive_ints("input_shape", input_shape))
        self.head = nn.Linear(features, positive_int("n_classes", n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))
