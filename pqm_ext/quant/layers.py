"""Layers whose weight lives in a quantised store (``NF4Store`` or ``UniformStore``).

``NF4Linear`` (a bitsandbytes ``Linear4bit``) covers 4-bit linear layers; these cover the rest:
linear layers of the uniform baseline, convolutions (Conformer pointwise/depthwise, subsampling,
Whisper's front convolutions) and token embeddings. ``QuantEmbedding.weight`` returns the
dequantised table, so code that ties it to an output projection (Whisper's decoder computes
``x @ token_embedding.weight.T``) keeps working and the table is stored once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pqm_ext.quant.cache import as_input_dtype


class QuantLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, store: torch.nn.Module, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.store = store
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.store.cached_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, as_input_dtype(self.weight, x), as_input_dtype(self.bias, x))


class QuantEmbedding(torch.nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, store: torch.nn.Module, padding_idx=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.store = store

    @property
    def weight(self) -> torch.Tensor:
        return self.store.cached_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)


class QuantConv(torch.nn.Module):
    """Conv1d/Conv2d with a quantised kernel (zero padding only, as in ESPnet and Whisper)."""

    def __init__(self, conv: torch.nn.Module, store: torch.nn.Module):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported for quantised convolutions")
        self.dims = 1 if isinstance(conv, torch.nn.Conv1d) else 2
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.store = store
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.store.cached_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, as_input_dtype(self.weight, x), as_input_dtype(self.bias, x), self.stride, self.padding,
                    self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}")
