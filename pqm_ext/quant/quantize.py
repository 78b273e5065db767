"""Quantise a model in place: pick a quantised replacement for each layer by its type.

Layers are matched by kind (linear / conv / embedding, subclasses included, e.g. Whisper's
``Linear``), then by name patterns. With ``materialize=False`` only the structure is built (empty
quantised stores), so a quantised checkpoint can be loaded without ever holding — or
re-quantising — the full-precision weights.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch

from pqm_ext.patterns import any_match
from pqm_ext.quant.config import QuantConfig
from pqm_ext.quant.layers import QuantConv, QuantEmbedding, QuantLinear
from pqm_ext.quant.nf4 import NF4Linear, NF4Store
from pqm_ext.quant.uniform import UniformStore

logger = logging.getLogger(__name__)

QUANTIZED_TYPES: Tuple[Type[torch.nn.Module], ...] = (NF4Linear, NF4Store, UniformStore, QuantLinear,
                                                      QuantConv, QuantEmbedding)


def layer_kind(module: torch.nn.Module) -> Optional[str]:
    if isinstance(module, QUANTIZED_TYPES):
        return None
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        return "conv"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    return None


def _store(weight: torch.Tensor, cfg: QuantConfig, materialize: bool) -> torch.nn.Module:
    source = weight.data if materialize else None
    if cfg.method == "int":
        return UniformStore(weight.shape, bits=cfg.bits, blocksize=cfg.blocksize, weight=source)
    return NF4Store(weight.shape, quant_type=cfg.method, blocksize=cfg.blocksize,
                    double_quant=cfg.double_quant, weight=source).to(weight.device)


def _quantized_linear(m, cfg, materialize):
    if cfg.method in ("nf4", "fp4"):
        return NF4Linear.from_linear(m, quantize=materialize, quant_type=cfg.method, blocksize=cfg.blocksize,
                                     double_quant=cfg.double_quant, compute_dtype=getattr(torch, cfg.compute_dtype))
    return QuantLinear(m.in_features, m.out_features, _store(m.weight, cfg, materialize), bias=m.bias)


def _quantized_conv(m, cfg, materialize):
    return QuantConv(m, _store(m.weight, cfg, materialize))


def _quantized_embedding(m, cfg, materialize):
    return QuantEmbedding(m.num_embeddings, m.embedding_dim, _store(m.weight, cfg, materialize), m.padding_idx)


# Dispatch by layer kind: the first (and only) builder for a kind makes the replacement.
BUILDERS: Dict[str, Callable] = {
    "linear": _quantized_linear,
    "conv": _quantized_conv,
    "embedding": _quantized_embedding,
}


def select_layers(model: torch.nn.Module, cfg: QuantConfig) -> List[str]:
    names = []
    for name, m in model.named_modules():
        kind = layer_kind(m)
        if kind is None or kind not in cfg.layers:
            continue
        if any_match(name, cfg.include) and not any_match(name, cfg.exclude):
            names.append(name)
    return names


def _check_untied(model: torch.nn.Module, names: List[str]) -> None:
    owners: Dict[int, str] = {}
    for name in names:
        weight = model.get_submodule(name).weight
        if id(weight) in owners:
            raise ValueError(f"{name} shares its weight with {owners[id(weight)]}: tied layers must be "
                             "quantised once (exclude one of them and tie through .weight)")
        owners[id(weight)] = name


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, torch.nn.MultiheadAttention):
        raise ValueError(f"{name}: nn.MultiheadAttention reads its projection weights directly; exclude it")
    setattr(parent, child, new)


def unquantized_float_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Floating parameters and persistent buffers that stay in full precision (norms, biases, ...)."""
    out = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, (NF4Store, UniformStore)):
            continue
        prefix = mod_name + "." if mod_name else ""
        tensors = list(m.named_parameters(recurse=False))
        tensors += [(n, b) for n, b in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set]
        for n, t in tensors:
            if t is not None and t.is_floating_point():
                out[prefix + n] = t
    return out


def quantize_model(model: torch.nn.Module, cfg: QuantConfig, *, materialize: bool = True) -> List[str]:
    """Replace the selected layers by quantised ones; return their names (empty for method none)."""
    if not cfg.enabled:
        return []
    names = select_layers(model, cfg)
    if not names:
        raise ValueError(f"quantisation matched no layer (layers={cfg.layers}, include={cfg.include}, "
                         f"exclude={cfg.exclude})")
    _check_untied(model, names)
    for name in names:
        m = model.get_submodule(name)
        _replace(model, name, BUILDERS[layer_kind(m)](m, cfg, materialize))
    storage = getattr(torch, cfg.storage_dtype)
    with torch.no_grad():
        for name, t in unquantized_float_tensors(model).items():
            rounded = t.data.to(storage)
            if (torch.isfinite(t.data) & ~torch.isfinite(rounded)).any():
                raise ValueError(f"{name}: a value of this unquantised tensor (largest magnitude "
                                 f"{t.data.abs().max().item():.3g}) does not fit storage_dtype {cfg.storage_dtype}: "
                                 "give storage_dtype float32 (or bfloat16) in the quantisation config")
            t.data = rounded.to(t.dtype)
    for p in model.parameters():
        if not p.is_floating_point():
            p.requires_grad_(False)
    model.pqm_quant_config = cfg
    logger.info("quantised %d layers with %s (blocksize %d)", len(names), cfg.label, cfg.blocksize)
    return names
