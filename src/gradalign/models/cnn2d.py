"""A small 2-d CNN for small images: 3x3 convolutions with ReLU, one 2x2 max pool, a linear head."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn
from torch.nn import functional as F

from gradalign.checks import positive_int, positive_ints


class CNN2d(nn.Module):
    """Input (N, C, H, W), or (N, H, W) viewed as one channel. ``convs``: one 3x3 convolution
    (padding 1, so H and W are kept) with ReLU per entry of ``channels``; then a 2x2 max pool
    (H // 2, W // 2) and ``head``, one linear map from the flattened features to the logits."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, channels: Sequence[int]) -> None:
        super().__init__()
        shape = positive_ints("input_shape", input_shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"input_shape={shape} is invalid: must be (H, W) or (C, H, W)")
        in_channels, height, width = (1, *shape) if len(shape) == 2 else shape
        if height < 2 or width < 2:
            raise ValueError(f"input_shape={shape} is too small for a 2x2 pool: H, W must be >= 2")
        widths = [in_channels, *positive_ints("model.channels", channels)]
        if len(widths) < 2:
            raise ValueError(f"model.channels={list(channels)} is invalid: must not be empty")
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in pairwise(widths)
        )
        features = widths[-1] * (height // 2) * (width // 2)
        self.head = nn.Linear(features, positive_int("n_classes", n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.head(F.max_pool2d(x, 2).flatten(1))
