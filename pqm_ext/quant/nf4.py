"""bitsandbytes 4-bit (NF4/FP4) weights that survive ``state_dict`` round trips.

bitsandbytes' ``Linear4bit`` saves its quantisation state as extra ``weight.*`` keys but cannot load
them back (``load_state_dict`` reports them as unexpected, and ``strict=False`` silently keeps wrong
scales). ESPnet's trainer saves and resumes whole-model state dicts, so every 4-bit weight here
rebuilds its ``Params4bit`` from those keys on load: checkpoints reload bit-exactly, without
re-quantising.
"""
from __future__ import annotations

import copy
from typing import Optional

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.nn import Params4bit

from pqm_ext.quant.cache import DequantCacheMixin, as_input_dtype


class _Prequantized:
    """Load ``weight`` + ``weight.<quant state>`` keys into a ``Params4bit`` named ``weight``."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        state_keys = [k for k in state_dict if k.startswith(key + ".")]
        if key in state_dict and state_keys:
            stats = {k[len(key) + 1:]: state_dict[k] for k in state_keys}
            device = self.weight.device
            try:
                self.weight = Params4bit.from_prequantized(
                    state_dict[key].to(device), stats, device=device, module=self)
            except (ValueError, KeyError, AssertionError) as e:
                error_msgs.append(f"{key}: unreadable 4-bit quantisation state ({e})")
                return
            self.drop_dequant_cache()
            state_dict = {k: v for k, v in state_dict.items() if k not in state_keys}
        elif key in state_dict:
            error_msgs.append(f"{key}: the checkpoint holds an unquantised weight where a 4-bit one "
                              "was expected (was it saved from another quantisation?)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize_params4bit(self.weight)


def dequantize_params4bit(param: Params4bit) -> torch.Tensor:
    """``bnb.functional.dequantize_4bit``, routed around a CPU kernel bug.

    bitsandbytes 0.50.2's native CPU kernel (seen on AVX512 machines; on an AMD EPYC without AVX512 it was right)
    dequantises a (rows, cols) weight row by row, which is wrong when ``cols`` is not a multiple of the
    blocksize (blocks run across rows): e.g. Whisper's first convolution (384 x 80 x 3) came back with a
    relative error of 1.1 instead of 0.09. Dequantising the same packed data as one flat row is exact on
    every CPU, so that is done for such shapes.
    """
    qs = param.quant_state
    if param.device.type == "cpu" and qs.shape[-1] % qs.blocksize:
        flat = copy.copy(qs)
        flat.shape = torch.Size([qs.shape.numel()])
        return bnb.functional.dequantize_4bit(param.data, flat).reshape(qs.shape)
    return bnb.functional.dequantize_4bit(param.data, qs)


class NF4Linear(_Prequantized, DequantCacheMixin, bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` (NF4 or FP4) that reloads from its own state dict.

    peft wraps it with its bitsandbytes LoRA layer (registered by type, see ``pqm_ext.lora``).
    bitsandbytes' AVX512-BF16 CPU inference path is disabled: it repacks weights in place and
    asserts ``out_features % 32 == 0``, which vocabulary-sized output layers break.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False, compute_dtype: Optional[torch.dtype] = None):
        super().__init__(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                         compress_statistics=double_quant, quant_type=quant_type)
        self.weight.blocksize = blocksize
        self.support_avx512bf16_for_cpu = False

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, quantize: bool = True, **kwargs) -> "NF4Linear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        device = linear.weight.device
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        w = new.weight
        if quantize:
            new.weight = Params4bit(linear.weight.data.contiguous().float(), requires_grad=False,
                                    blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                                    quant_type=w.quant_type, module=new)._quantize(device)
        else:  # structure only: the packed data and its state come from a state dict
            packed = torch.empty(((linear.in_features * linear.out_features + 1) // 2, 1), dtype=torch.uint8)
            new.weight = Params4bit(packed, requires_grad=False, blocksize=w.blocksize,
                                    compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                    bnb_quantized=True, module=new)
        return new.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On the CPU bitsandbytes dequantises and multiplies too; doing it here avoids its kernel bug
        # (see dequantize_params4bit). On CUDA its fused 4-bit kernels run unless the cache is on.
        if self.dequant_cache_enabled or x.device.type == "cpu":
            return F.linear(x, as_input_dtype(self.cached_weight(), x), as_input_dtype(self.bias, x))
        return super().forward(x)


class NF4Store(_Prequantized, DequantCacheMixin, torch.nn.Module):
    """A 4-bit weight of any shape (embedding tables, convolution kernels), flattened to 2-D."""

    def __init__(self, shape, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                 weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.shape = torch.Size(shape)
        if weight is None:  # structure only: the data comes from a state dict
            packed = torch.empty(((self.shape.numel() + 1) // 2, 1), dtype=torch.uint8)
            self.weight = Params4bit(packed, requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type,
                                     bnb_quantized=True)
        else:
            flat = weight.detach().float().reshape(self.shape[0], -1).contiguous()
            self.weight = Params4bit(flat, requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type)
            self.weight = self.weight._quantize(weight.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _apply(self, fn, recurse=True):
        # Keep Params4bit (and its quantisation state) when the module moves between devices.
        qs = self.weight.quant_state
        out = super()._apply(fn, recurse)
        if qs is not None:
            qs.to(self.weight.device)
            if not isinstance(self.weight, Params4bit) or self.weight.quant_state is None:
                self.weight = Params4bit(self.weight.data, requires_grad=False, quant_state=qs,
                                         blocksize=qs.blocksize, compress_statistics=qs.nested,
                                         quant_type=qs.quant_type, bnb_quantized=True)
        self.drop_dequant_cache()
        return out

    def dequantize_weight(self) -> torch.Tensor:
        return super().dequantize_weight().reshape(self.shape)

    def stored_bytes(self) -> int:
        return _params4bit_bytes(self.weight)


def _params4bit_bytes(param: Params4bit) -> int:
    """Bytes of the packed weight and its quantisation state (absmax, nested absmax, code books)."""
    qs = param.quant_state
    n = param.data.numel() * param.data.element_size()
    n += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
    if qs.nested:
        n += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        n += qs.state2.code.numel() * qs.state2.code.element_size()
    return n


def nf4_linear_bytes(layer: NF4Linear) -> int:
    return _params4bit_bytes(layer.weight)
