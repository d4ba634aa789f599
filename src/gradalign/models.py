"""Model builders for mnist1d: the MLP and CNN of the mnist1d paper, with configurable sizes.

Every option is required (the Hydra model configs hold the values), and parameter names are
stable and readable ("layers.0.weight", "convs.2.bias", "head.weight") because they key the
per-parameter alignment metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Fully connected ReLU network: ``layers.0 .. layers.{len(hidden)}``, the last one the output.

    With ``residual``, each hidden->hidden layer whose input and output widths are equal adds its
    input back, as the paper's MLPBase does: ``h = relu(L1 x); h = h + relu(L2 h); out = L3 h``.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], n_classes: int, residual: bool):
        super().__init__()
        widths = [input_dim, *hidden, n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        # skips[i]: whether hidden layer i adds its input back (hidden->hidden, equal widths).
        self.skips = [residual and i > 0 and a == b
                      for i, (a, b) in enumerate(pairwise(widths[:-1]))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden_layers, output = self.layers
        for layer, skip in zip(hidden_layers, self.skips, strict=True):
            h = F.relu(layer(x))
            x = x + h if skip else h
        return output(x)


class CNN(nn.Module):
    """The paper's ConvBase: three strided Conv1d layers with ReLU, then a linear head.

    Input (N, length) is viewed as (N, 1, length); convs: (1->C, k5, s2, p1), (C->C, k3, s2, p1),
    (C->C, k3, s2, p1); the flattened C * L' features (L' = 5 for length 40) feed ``head``.
    """

    def __init__(self, input_dim: int, channels: int, n_classes: int):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=1),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
        ])
        length = input_dim
        for conv in self.convs:
            length = (length + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        if length < 1:
            raise ValueError(f"input_dim={input_dim} is too short for the CNN's three convolutions")
        self.head = nn.Linear(channels * length, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.head(x.flatten(1))


_OPTIONS = {"mlp": ("hidden", "residual"), "cnn": ("channels",)}


def build_model(name: str, *, input_dim: int, n_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` ("mlp": options hidden, residual; "cnn": option channels).

    All options are required; unknown names or options and non-positive sizes raise ValueError.
    """
    if name not in _OPTIONS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(_OPTIONS)}")
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    missing = sorted(set(allowed) - set(options))
    if unknown or missing:
        raise ValueError(
            f"model {name!r}: unknown options {unknown}, missing options {missing}; "
            f"expected exactly {list(allowed)}"
        )
    check_positive_int("input_dim", input_dim)
    check_positive_int("n_classes", n_classes)
    if name == "mlp":
        hidden, residual = options["hidden"], options["residual"]
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        for width in hidden:
            check_positive_int("hidden width", width)
        if not isinstance(residual, bool):
            raise ValueError(f"residual must be a bool, got {residual!r}")
        return MLP(input_dim, list(hidden), n_classes, residual)
    check_positive_int("channels", options["channels"])
    return CNN(input_dim, options["channels"], n_classes)


def check_positive_int(what: str, value: Any) -> None:
    """Raise ValueError naming ``what`` unless ``value`` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
