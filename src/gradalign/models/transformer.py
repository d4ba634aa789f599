"""A small causal transformer language model (GPT-style, pre-norm), in plain PyTorch.

It reads (N, T) token ids and returns (N, T, vocabulary) logits, the prediction at position t
depending only on the tokens at positions <= t. ``input_shape`` = (context,) sets the longest
sequence it reads (its learned position embeddings); ``n_classes`` is the vocabulary, of the
inputs and of the predictions alike.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from gradalign.checks import positive_int, positive_ints, probability


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position attends to itself and earlier ones."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)  # queries, keys and values of all heads at once
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, width = x.shape
        q, k, v = (
            part.view(n, t, self.heads, width // self.heads).transpose(1, 2)  # (N, heads, T, d)
            for part in self.qkv(x).split(width, dim=2)
        )
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, width))


class Block(nn.Module):
    """x + attention(norm1(x)), then x + feed_forward(norm2(x)); dropout on each branch."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(  # position-wise: width -> 4 * width, GELU, -> width
            OrderedDict(
                fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), proj=nn.Linear(4 * width, width)
            )
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


class Transformer(nn.Module):
    """``token_embedding`` + ``position_embedding``, ``blocks.0 .. blocks.{layers-1}``, a final
    ``norm`` and the ``head`` (width -> vocabulary, not tied to the token embedding).

    Weights start as in GPT-2: normal(0, 0.02) for linear maps and embeddings, zero biases, and
    the projections back into the residual stream scaled by 1 / sqrt(2 * layers), so the stream's
    variance does not grow with depth.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        width: int,
        layers: int,
        heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        shape = positive_ints("input_shape", input_shape)
        if len(shape) != 1:
            raise ValueError(f"input_shape={shape} is invalid: must be (context,) of token ids")
        vocabulary = positive_int("n_classes", n_classes)
        positive_int("model.width", width)
        positive_int("model.layers", layers)
        positive_int("model.heads", heads)
        if width % heads:
            raise ValueError(f"model.heads={heads} is invalid: must divide model.width={width}")
        probability("model.dropout", dropout)
        self.context = shape[0]
        self.token_embedding = nn.Embedding(vocabulary, width)
        self.position_embedding = nn.Embedding(self.context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attention.proj, block.feed_forward.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(
                f"a sequence of {length} tokens is longer than the context {self.context}"
            )
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
