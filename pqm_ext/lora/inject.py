"""Put peft LoRA adapters into an (optionally NF4-quantised) ESPnet model, in place.

``peft.inject_adapter_in_model`` keeps the ESPnetASRModel type (ESPnet's trainer asserts it);
``get_peft_model`` would wrap it. peft picks its bitsandbytes LoRA layer for our ``NF4Linear`` by
*type* (a custom-module mapping), not through a model-wide ``is_loaded_in_4bit`` flag, and its
plain layers for full-precision Linear/Conv; a quantised pointwise convolution gets our
``LoraQuantConv1d`` (pqm_ext.lora.quant_conv). Adapters are kept unmerged: merging into NF4 weights
re-quantises them and changes the base every speaker shares.
"""
from __future__ import annotations

import logging
from typing import List

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

from pqm_ext.lora.batchnorm import batchnorm_layers, freeze_batchnorm, remember_base_statistics
from pqm_ext.lora.config import AdapterConfig
from pqm_ext.lora.quant_conv import LoraQuantConv1d, is_pointwise_conv1d
from pqm_ext.patterns import any_match, patterns_to_regex
from pqm_ext.quant.layers import QuantConv, QuantLinear
from pqm_ext.quant.nf4 import NF4Linear

logger = logging.getLogger(__name__)

LORA_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding, QuantConv)


def target_layers(model: torch.nn.Module, cfg: AdapterConfig) -> List[str]:
    # A layer already wrapped by peft (an earlier adapter) is a target again: peft adds the new
    # adapter beside the others (one per speaker, see pqm_ext.lora.mixed).
    names = [n for n, m in model.named_modules()
             if isinstance(m, LORA_TYPES + (LoraLayer,)) and "lora_" not in n and ".base_layer" not in n
             and any_match(n, cfg.target_modules)]
    uniform = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and any_match(n, cfg.target_modules)]
    if uniform:  # else "matched no layer", as if the names were wrong
        raise ValueError(f"LoRA target {uniform[0]} is a uniform integer-quantised linear layer (the int baseline), "
                         "which takes no adapter: adapt an NF4 (or full-precision) model")
    if not names:
        raise ValueError(f"LoRA target_modules {cfg.target_modules} matched no layer of the model")
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, QuantConv) and not is_pointwise_conv1d(m):
            raise ValueError(f"LoRA target {n} is a quantised {m.kernel_size} convolution with {m.groups} groups: "
                             "only pointwise (1x1) convolutions of a quantised model can take an adapter")
    return names


def add_adapter(model: torch.nn.Module, cfg: AdapterConfig, name: str = "default") -> List[str]:
    """Inject LoRA adapter ``name``; only LoRA parameters stay trainable. Returns the wrapped layers."""
    layers = target_layers(model, cfg)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=patterns_to_regex(cfg.target_modules))
    peft_cfg._register_custom_module({NF4Linear: LoraLinear4bit, QuantConv: LoraQuantConv1d})
    inject_adapter_in_model(peft_cfg, model, adapter_name=name)
    for layer in layers:  # peft makes new LoRA modules in train mode: in a model set to eval, dropout while decoding
        model.get_submodule(layer).train(model.training)
    for pname, p in model.named_parameters():
        p.requires_grad_(f"lora_A.{name}." in pname or f"lora_B.{name}." in pname)
    remember_base_statistics(model)  # before training moves them: a speaker without statistics gets these
    freeze_batchnorm(model, frozen=cfg.batchnorm == "frozen")
    n_bn = len(batchnorm_layers(model))
    if n_bn:
        logger.info("%d BatchNorm layers: %s", n_bn, "frozen" if cfg.batchnorm == "frozen"
                    else "statistics estimated on the speaker's data, saved with the adapter")
    elif cfg.batchnorm == "speaker":
        logger.info("batchnorm: speaker changes nothing: the model has no BatchNorm layer")
    logger.info("LoRA %r (rank %d, alpha %g) on %d layers, %d trainable parameters", name, cfg.rank, cfg.alpha,
                len(layers), adapter_num_params(model, name))
    return layers


def adapter_num_params(model: torch.nn.Module, name: str = "default") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if f"lora_A.{name}." in n or f"lora_B.{name}." in n)
