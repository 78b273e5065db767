"""Reuse dequantised weights across calls.

On the CPU, bitsandbytes dequantises a 4-bit weight on every forward; autoregressive decoding
calls each layer once per token, and Whisper's tied 51864-row output projection dominates. With
the cache on, each layer dequantises once and keeps the float copy until the cache is dropped:
the same arithmetic (dequantise, then a dense matmul), paid once. The packed weights stay the
model's state; the copy is a transient working buffer, never saved.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


class DequantCacheMixin:
    """For modules with a frozen quantised weight and ``dequantize_weight()``."""

    dequant_cache_enabled: bool = False
    dequant_cache_dtype: Optional[torch.dtype] = None  # e.g. float16 on a GPU: the compute dtype
    _dequant_cache: Optional[torch.Tensor] = None

    def cached_weight(self) -> torch.Tensor:
        if not self.dequant_cache_enabled:
            return self.dequantize_weight()
        if self._dequant_cache is None:
            with torch.no_grad():
                w = self.dequantize_weight()
                self._dequant_cache = w if self.dequant_cache_dtype is None else w.to(self.dequant_cache_dtype)
        return self._dequant_cache

    def drop_dequant_cache(self) -> None:
        self._dequant_cache = None


def as_input_dtype(t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` (a weight or bias) in the dtype the product with ``x`` will run in.

    Under autocast the weight is left alone: autocast casts both operands itself, and an fp16 copy is
    already what float16 autocast wants, while ``x`` is often float32 there (after a LayerNorm), so
    ``t.to(x.dtype)`` would widen the weight only for autocast to narrow it again, two extra kernels
    per layer per decoding step.
    """
    if t is None or torch.is_autocast_enabled(x.device.type):
        return t
    return t.to(x.dtype)


def set_dequant_cache(model: torch.nn.Module, enabled: bool, dtype: Optional[torch.dtype] = None) -> None:
    """Turn caching on/off (dropping current copies); ``dtype``: keep the copies in this dtype."""
    for m in model.modules():
        if isinstance(m, DequantCacheMixin):
            m.dequant_cache_enabled = enabled
            m.dequant_cache_dtype = dtype
            m.drop_dequant_cache()


def dequant_cache_bytes(model: torch.nn.Module) -> int:
    """Bytes held by dequantised copies right now."""
    return sum(m._dequant_cache.numel() * m._dequant_cache.element_size() for m in model.modules()
               if isinstance(m, DequantCacheMixin) and m._dequant_cache is not None)


@contextlib.contextmanager
def dequant_cache(model: torch.nn.Module, enabled: bool = True,
                  dtype: Optional[torch.dtype] = None) -> Iterator[torch.nn.Module]:
    """Cache dequantised weights inside the block (e.g. one decoding job), free them after."""
    set_dequant_cache(model, enabled, dtype)
    try:
        yield model
    finally:
        set_dequant_cache(model, False)
