"""What to quantise and how: one dataclass, validated on construction, read from YAML dicts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from pqm_ext.utils.options import dataclass_from_dict

METHODS = ("nf4", "fp4", "int", "none")
LAYER_KINDS = ("linear", "conv", "embedding")


@dataclass
class QuantConfig:
    """Block-wise weight quantisation of a model.

    method:        nf4 / fp4 (bitsandbytes 4-bit), int (uniform symmetric round-to-nearest with
                   ``bits`` bits, the paper's baseline), none (full precision).
    blocksize:     weights per absmax scale (the paper and QLoRA use 64).
    double_quant:  also quantise the absmax scales to 8 bits (QLoRA's double quantisation; nf4/fp4).
    bits:          bits per weight for method=int.
    compute_dtype: dtype the dequantised weights are multiplied in.
    storage_dtype: dtype of the parameters left unquantised (norms, biases): float16 as in the
                   released Whisper checkpoints, or float32.
    layers:        kinds of layers to quantise: linear (incl. subclasses), conv (Conv1d/Conv2d, e.g.
                   Conformer pointwise and depthwise convolutions), embedding (token embeddings;
                   Whisper's is tied with its output projection and is quantised once).
    include/exclude: module-name patterns (globs on dot boundaries); exclude wins.
    """

    method: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    bits: int = 4
    compute_dtype: str = "float32"
    storage_dtype: str = "float16"
    layers: List[str] = field(default_factory=lambda: list(LAYER_KINDS))
    include: List[str] = field(default_factory=lambda: ["*"])
    exclude: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantisation method {self.method!r} is not one of {METHODS}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize {self.blocksize} must be a power of two in 32..4096")
        if self.method == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits}: uniform quantisation supports 2..8 bits")
        if self.double_quant and self.method not in ("nf4", "fp4"):
            raise ValueError("double_quant applies to nf4/fp4 only")
        for name in ("compute_dtype", "storage_dtype"):
            if not isinstance(getattr(torch, getattr(self, name), None), torch.dtype):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a torch dtype")
        unknown = set(self.layers) - set(LAYER_KINDS)
        if unknown:
            raise ValueError(f"unknown layer kinds {sorted(unknown)}; choose from {LAYER_KINDS}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def label(self) -> str:
        """Short name used in result files, e.g. ``nf4_dq`` or ``int4``."""
        if self.method == "int":
            return f"int{self.bits}"
        return self.method + ("_dq" if self.double_quant else "")

    @classmethod
    def from_dict(cls, conf: Optional[dict]) -> "QuantConfig":
        return dataclass_from_dict(cls, conf, "quantisation")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
