"""The mnist1d paper's ConvBase: three strided 1-d convolutions with ReLU, then a linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from gradalign.checks import channels_and_length, positive_int


class CNN(nn.Module):
    """Input (N, length) is viewed as (N, 1, length), or (N, C, length) is taken as is;
    convs: (C->channels, k5, s2, p1), (channels->channels, k3, s2, p1) twice; the flattened
    channels * L' features (L' = 5 for length 40) feed ``head``."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, channels: int) -> None:
        super().__init__()
        in_channels, length = channels_and_length(input_shape)
        positive_int("model.channels", channels)
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(in_channels, channels, kernel_size=5, stride=2, padding=1),
                nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
                nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            ]
        )
        for conv in self.convs:
            length = (length + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        if length < 1:
            raise ValueError(
                f"input_shape={list(input_shape)} is too short for the CNN's three convolutions"
            )
        self.head = nn.Linear(channels * length, positive_int("n_classes", n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.head(x.flatten(1))
