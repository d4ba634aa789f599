"""The mnist1d paper's GRUBase: a small (bidirectional) GRU reads the sequence one value per step,
and a linear head reads its outputs at every step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradalign.checks import boolean, channels_and_length, positive_int


class GRU(nn.Module):
    """Input (N, length) is read as ``length`` steps of one value, or (N, C, length) as ``length``
    steps of C values. ``rnn``: a one-layer GRU of ``hidden`` units per direction (both directions
    with ``bidirectional``), initial state zero; ``head``: one linear map from the outputs of all
    steps, flattened (length * hidden * directions features), to the class logits. The paper's
    model is hidden 6, bidirectional (5134 parameters on mnist1d)."""

    def __init__(
        self, input_shape: Sequence[int], n_classes: int, hidden: int, bidirectional: bool
    ) -> None:
        super().__init__()
        in_channels, length = channels_and_length(input_shape)
        positive_int("model.hidden", hidden)
        directions = 2 if boolean("model.bidirectional", bidirectional) else 1
        self.rnn = nn.GRU(in_channels, hidden, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(length * hidden * directions, positive_int("n_classes", n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.unsqueeze(-1) if x.dim() == 2 else x.transpose(1, 2)  # (N, length, C)
        outputs, _ = self.rnn(steps)  # (N, length, hidden * directions)
        return self.head(outputs.flatten(1))
