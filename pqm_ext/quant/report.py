"""Model size before and after quantisation, per module and in total.

Sizes count parameters (what a checkpoint must store to rebuild the model); buffers that are
recomputed or statistics (Whisper's sinusoidal positions, BatchNorm running statistics) are not
counted on either side. Unquantised parameters count at the config's storage dtype.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch
from bitsandbytes.nn import Params4bit

from pqm_ext.quant.nf4 import NF4Linear, NF4Store, nf4_linear_bytes
from pqm_ext.quant.uniform import UniformStore


@dataclass
class ModuleSize:
    name: str
    kind: str
    params: int
    bytes: int


@dataclass
class SizeReport:
    method: str
    total_params: int
    quantized_params: int
    bytes_quantized: int
    bytes_unquantized: int
    modules: List[ModuleSize] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.bytes_quantized + self.bytes_unquantized

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.total_params

    @property
    def ratio_fp32(self) -> float:
        return self.fp32_bytes / self.bytes

    @property
    def ratio_fp16(self) -> float:
        return 2 * self.total_params / self.bytes

    def to_dict(self) -> Dict:
        d = asdict(self)
        d.update(bytes=self.bytes, fp32_bytes=self.fp32_bytes, fp16_bytes=2 * self.total_params,
                 ratio_fp32=round(self.ratio_fp32, 3), ratio_fp16=round(self.ratio_fp16, 3),
                 quantized_fraction=round(self.quantized_params / max(self.total_params, 1), 5))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_text(self, max_modules: int = 0) -> str:
        mb = 1e6
        lines = [f"{'module':60s} {'kind':8s} {'params':>10s} {'fp32 MB':>8s} {'MB':>8s}"]
        for m in self.modules[: max_modules or len(self.modules)]:
            lines.append(f"{m.name:60s} {m.kind:8s} {m.params:10d} {4 * m.params / mb:8.3f} {m.bytes / mb:8.3f}")
        lines += [
            f"method: {self.method}",
            f"parameters: {self.total_params} total, {self.quantized_params} quantised "
            f"({100 * self.quantized_params / max(self.total_params, 1):.2f}%)",
            f"size: fp32 {self.fp32_bytes / mb:.2f} MB, fp16 {2 * self.total_params / mb:.2f} MB, "
            f"quantised {self.bytes / mb:.2f} MB ({self.bytes_quantized / mb:.2f} MB quantised weights + "
            f"{self.bytes_unquantized / mb:.2f} MB other parameters)",
            f"ratio: {self.ratio_fp32:.2f}x vs fp32, {self.ratio_fp16:.2f}x vs fp16",
        ]
        return "\n".join(lines)


def write_size_report(report: "SizeReport", out_dir) -> None:
    from pathlib import Path

    out_dir = Path(out_dir)
    (out_dir / "size_report.txt").write_text(report.to_text() + "\n")
    (out_dir / "size_report.json").write_text(report.to_json() + "\n")


def size_report(model: torch.nn.Module, method: str = "", storage_dtype: str = "float16",
                exclude_lora: bool = True) -> SizeReport:
    """Measure a (possibly quantised) model; LoRA parameters are left out (they are the adapter)."""
    storage_size = torch.empty(0, dtype=getattr(torch, storage_dtype)).element_size()
    method = method or getattr(getattr(model, "pqm_quant_config", None), "label", "fp32")
    modules, total, quant, bq, bu = [], 0, 0, 0, 0
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            n, b = m.in_features * m.out_features, nf4_linear_bytes(m)
        elif isinstance(m, (NF4Store, UniformStore)):
            n, b = m.shape.numel(), m.stored_bytes()
        else:
            n = b = 0
        if n:
            modules.append(ModuleSize(name, type(m).__name__, n, b))
            total, quant, bq = total + n, quant + n, bq + b
        for pname, p in m.named_parameters(recurse=False):
            if isinstance(p, Params4bit):  # counted above with its quantisation state
                continue
            if exclude_lora and "lora_" in f"{name}.{pname}":
                continue
            total += p.numel()
            bu += p.numel() * (storage_size if p.is_floating_point() else p.element_size())
    return SizeReport(method, total, quant, bq, bu, modules)
