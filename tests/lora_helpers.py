"""Shared helper for the mixed-adapter tests (tests/test_lora.py, tests/test_perf_paths.py)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def one_adapter_at_a_time(mixed, layer: torch.nn.Module, x: torch.Tensor,
                          names: Sequence[Optional[str]]) -> List[torch.Tensor]:
    """The reference for a mixed batch: row i through ``layer`` with adapter ``names[i]`` alone
    (``None``: the base layer). Leaves the last named adapter active."""
    want = []
    with torch.no_grad():
        for i, n in enumerate(names):
            if n is None:
                want.append(layer.get_base_layer()(x[i:i + 1]))
            else:
                mixed.use(n)
                want.append(layer(x[i:i + 1]))
    return want
