"""A fully connected ReLU network, optionally residual as the mnist1d paper's MLPBase."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn
from torch.nn import functional as F

from gradalign.checks import boolean, positive_int, positive_ints


class MLP(nn.Module):
    """``layers.0 .. layers.{len(hidden)}``, the last one the output; inputs are flattened.

    With ``residual``, each hidden->hidden layer whose input and output widths are equal adds its
    input back, as the paper's MLPBase does: ``h = relu(L1 x); h = h + relu(L2 h); out = L3 h``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        hidden: Sequence[int],
        residual: bool,
    ) -> None:
        super().__init__()
        widths = [
            math.prod(positive_ints("input_shape", input_shape)),
            *positive_ints("model.hidden", hidden),
            positive_int("n_classes", n_classes),
        ]
        boolean("model.residual", residual)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        # skips[i]: whether hidden layer i adds its input back (hidden->hidden, equal widths).
        self.skips = [
            residual and i > 0 and a == b for i, (a, b) in enumerate(pairwise(widths[:-1]))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        *hidden_layers, output = self.layers
        for layer, skip in zip(hidden_layers, self.skips, strict=True):
            h = F.relu(layer(x))
            x = x + h if skip else h
        return output(x)
