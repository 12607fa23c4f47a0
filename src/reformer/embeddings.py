"""Token and positional embeddings.

Axial positional embeddings (the authors' choice for 64K contexts): positions are laid on a
grid n_1 x n_2 x ... (product >= max_seq_len); each axis k has a table (n_k, d_k) and a
position's embedding is the concatenation of its row in every table (sum d_k = d_model).
Parameters: sum n_k d_k instead of max_seq_len * d_model (for 64K x 256: 65,536 vs 16.8M).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class AxialPositionalEmbedding(nn.Module):
    def __init__(self, shape: tuple[int, ...], dims: tuple[int, ...]) -> None:
        super().__init__()
        assert len(shape) == len(dims)
        self.shape = tuple(shape)
        self.dims = tuple(dims)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(n, d) * 0.02) for n, d in zip(shape, dims)
        )
        # position p = sum_k i_k * stride_k (row-major over the grid)
        self.strides = [math.prod(shape[k + 1 :]) for k in range(len(shape))]

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Embeddings of positions offset .. offset + length - 1: (length, d_model)."""
        pos = torch.arange(offset, offset + length, device=self.weights[0].device)
        parts = [
            w[(pos // stride) % n] for w, n, stride in zip(self.weights, self.shape, self.strides)
        ]
        return torch.cat(parts, dim=-1)


class AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_seq_len, d_model) * 0.02)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Embeddings of positions offset .. offset + length - 1: (length, d_model)."""
        return self.weight[offset : offset + length]
