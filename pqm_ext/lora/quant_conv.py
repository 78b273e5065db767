"""peft LoRA for a quantised pointwise convolution (the 1x1 Conv1d layers of a Conformer convolution module).

peft's own ``Conv1d`` LoRA builds its A and B with ``type(base_layer)``; for our ``QuantConv`` (a frozen
4-bit kernel) that would make A and B quantised layers too. This layer is registered with peft as a
custom module for ``QuantConv`` and gives the quantised convolution plain float 1x1 convolutions
``A: in -> r`` and ``B: r -> out``: the same parameter names, shapes and sum (``base(x) + B(A(x)) * alpha/r``)
as peft's ``Conv1d`` LoRA on a float model, so saving, loading, mixed batches and folding treat both
alike. Only pointwise convolutions are supported: a depthwise kernel has no low-rank channel mixing to
adapt, and the folded and batched paths rely on a 1x1 kernel being a matrix.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.lora import LoraLayer

from pqm_ext.quant.layers import QuantConv


def is_pointwise_conv1d(module: torch.nn.Module) -> bool:
    """A Conv1d (float or quantised) that is a matrix over channels: kernel 1, stride 1, no padding, one group."""
    conv1d = isinstance(module, torch.nn.Conv1d) or (isinstance(module, QuantConv) and module.dims == 1)
    return (conv1d and tuple(module.kernel_size) == (1,) and tuple(module.stride) == (1,)
            and tuple(module.padding) == (0,) and module.groups == 1)


class LoraQuantConv1d(torch.nn.Module, LoraLayer):
    """LoRA on a quantised pointwise ``QuantConv`` (unmerged: the 4-bit kernel is never touched)."""

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: float = 1,
                 **kwargs):
        if not is_pointwise_conv1d(base_layer):
            raise ValueError(f"LoRA on a quantised convolution needs a pointwise Conv1d (kernel 1, stride 1, one "
                             f"group); this one is {base_layer!r}")
        super().__init__()
        with warnings.catch_warnings():  # peft warns that it does not know QuantConv: this class is why
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        if config.use_dora or config.lora_bias or config.use_rslora:
            raise ValueError("LoRA on quantised convolutions supports plain LoRA only (no DoRA, rsLoRA or bias)")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = (torch.nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                                           else torch.nn.Identity())
        self.lora_A[adapter_name] = torch.nn.Conv1d(self.in_features, r, 1, bias=False)
        self.lora_B[adapter_name] = torch.nn.Conv1d(r, self.out_features, 1, bias=False)
        self.lora_bias[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.use_rslora[adapter_name] = False
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B A * scale`` as a (out, in, 1) kernel, the shape of the base's."""
        a, b = self.lora_A[adapter].weight[..., 0], self.lora_B[adapter].weight[..., 0]
        return (b @ a * self.scaling[adapter]).unsqueeze(-1)

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[adapter]
        return self.lora_B[adapter](a(self.lora_dropout[adapter](x.to(a.weight.dtype)))) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, adapter_names: Optional[list] = None, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:  # peft's mixed batches: row i uses adapter_names[i]
            for name in set(adapter_names) & set(self.lora_A):
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                result[rows] = result[rows] + self._delta(name, x[rows]).to(result.dtype)
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self._delta(name, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
