"""BatchNorm in a speaker adapter: the base's statistics, or the speaker's saved with the adapter.

A Conformer's convolution modules normalise with BatchNorm, whose running statistics are buffers, not
parameters: LoRA training in train mode moves them, and a saved adapter that lacks them does not give
back the model it was trained with. ``AdapterConfig.batchnorm`` picks one of two correct behaviours:

* ``frozen``: BatchNorm stays in inference mode while the adapter trains (a forward pre-hook, so the
  trainer's ``model.train()`` cannot undo it); every speaker is decoded with the base's statistics.
* ``speaker``: BatchNorm trains in train mode (batch statistics), and once the adapter is trained its
  statistics are estimated afresh on the speaker's adaptation data as AdaBN does (Li et al., 2016:
  re-estimating normalisation statistics adapts a network to a new domain): one pass in inference mode
  (no dropout, no SpecAugment, the final LoRA weights) with a cumulative average over batches, so they
  are the statistics of what decoding will feed the layer. They are saved in the adapter file beside
  the LoRA weights as ``pqm_batchnorm.<layer>.running_mean`` / ``.running_var``. Loading such an
  adapter puts them in; loading one without them puts the base's back, so a recogniser that decodes one
  speaker after another never carries a speaker's statistics over to the next.

The affine weights stay frozen either way. Mixed batches (``pqm_ext.lora.mixed``) normalise each row
with its own speaker's statistics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from pqm_ext.utils.errors import InputError

MODES = ("frozen", "speaker")
PREFIX = "pqm_batchnorm."
STATISTICS = ("running_mean", "running_var")
_BASE = "_pqm_base_batchnorm"


def batchnorm_layers(model: torch.nn.Module) -> List[Tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _eval_hook(module, _inputs):
    if module._pqm_frozen:
        module.eval()


def freeze_batchnorm(model: torch.nn.Module, frozen: bool = True) -> int:
    """Keep every BatchNorm in eval mode even when the trainer calls ``model.train()`` (``frozen=False``:
    let them follow it again); returns how many layers changed."""
    n = 0
    for _, m in batchnorm_layers(model):
        if not hasattr(m, "_pqm_frozen"):
            m.register_forward_pre_hook(_eval_hook)
            m._pqm_frozen = False
        if m._pqm_frozen != frozen:
            m._pqm_frozen = frozen
            n += 1
    return n


def remember_base_statistics(model: torch.nn.Module) -> None:
    """Keep a copy of the base's statistics (once: before any adapter's training moves them)."""
    if _BASE not in model.__dict__:
        model.__dict__[_BASE] = statistics_of(model)


def base_statistics(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The base's statistics: the copy kept when the first adapter was added, else the model's own."""
    return model.__dict__.get(_BASE) or statistics_of(model)


def statistics_of(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every BatchNorm's running statistics, keyed as they are saved in an adapter file."""
    return {f"{PREFIX}{name}.{stat}": getattr(m, stat).detach().cpu().clone()
            for name, m in batchnorm_layers(model) for stat in STATISTICS}


def split_statistics(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(LoRA tensors, BatchNorm statistics) of an adapter file's tensors."""
    stats = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    return {k: v for k, v in tensors.items() if k not in stats}, stats


def check_statistics(model: torch.nn.Module, stats: Dict[str, torch.Tensor], path: Path) -> None:
    """Refuse statistics that do not cover exactly this model's BatchNorm layers, with their shapes."""
    want = statistics_of(model)
    if set(stats) != set(want):
        missing, extra = sorted(set(want) - set(stats)), sorted(set(stats) - set(want))
        raise InputError(path, f"BatchNorm statistics do not fit the model: missing {missing[:3]}, extra {extra[:3]}")
    for k, v in stats.items():
        if v.shape != want[k].shape:
            raise InputError(path, f"{k}: shape {tuple(v.shape)} does not fit the model's {tuple(want[k].shape)}")


def put_statistics(model: torch.nn.Module, stats: Optional[Dict[str, torch.Tensor]]) -> None:
    """Set the running statistics (``None``: the base's)."""
    stats = base_statistics(model) if stats is None else stats
    with torch.no_grad():
        for name, m in batchnorm_layers(model):
            for stat in STATISTICS:
                key = f"{PREFIX}{name}.{stat}"
                if key in stats:
                    getattr(m, stat).copy_(stats[key])


@torch.no_grad()
def reestimate_statistics(model: torch.nn.Module, batches: Iterable[Dict[str, torch.Tensor]]) -> int:
    """AdaBN: set every BatchNorm's running statistics to the average, over ``batches`` (ESPnet batches:
    ``speech``, ``speech_lengths``), of its input's statistics with the rest of the model in inference mode
    (each BatchNorm normalising with the batch's own, as in training); each batch weighs the same.
    Returns the number of batches; the model's train/eval mode is kept."""
    layers = [m for _, m in batchnorm_layers(model)]
    if not layers:
        return 0
    was_training = model.training
    saved = [(m.momentum, getattr(m, "_pqm_frozen", None)) for m in layers]
    model.eval()
    n = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
            if hasattr(m, "_pqm_frozen"):
                m._pqm_frozen = False
        for batch in batches:
            model.encode(batch["speech"], batch["speech_lengths"])
            n += 1
    finally:
        for m, (momentum, frozen) in zip(layers, saved):
            m.momentum = momentum
            if frozen is not None:
                m._pqm_frozen = frozen
        model.train(was_training)
    if not n:
        raise ValueError("no batches to estimate the BatchNorm statistics from")
    return n


class RowStatistics:
    """Inference-mode BatchNorm in which row ``i`` of a batch uses statistics set ``slots[i]``.

    ``sets`` holds one statistics dict per slot (``None``: the base's). Each layer normalises as
    eval-mode BatchNorm does, ``(x - mean) / sqrt(var + eps) * weight + bias``, with the mean and
    variance gathered per row.
    """

    def __init__(self, model: torch.nn.Module, sets: List[Optional[Dict[str, torch.Tensor]]]):
        self.model = model
        base = base_statistics(model)
        self.layers = batchnorm_layers(model)
        self.mean: Dict[str, torch.Tensor] = {}
        self.inv_std: Dict[str, torch.Tensor] = {}
        for name, m in self.layers:
            mean = torch.stack([(s or base)[f"{PREFIX}{name}.running_mean"] for s in sets])
            var = torch.stack([(s or base)[f"{PREFIX}{name}.running_var"] for s in sets])
            self.mean[name] = mean.to(m.running_mean.device)
            self.inv_std[name] = torch.rsqrt(var + m.eps).to(m.running_var.device)
        self.slots = torch.zeros(0, dtype=torch.long)

    def patch(self) -> None:
        for name, m in self.layers:
            m.forward = self._forward(name, m)

    def unpatch(self) -> None:
        for _, m in self.layers:
            m.__dict__.pop("forward", None)

    def _forward(self, name: str, m: _BatchNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.size(0) != self.slots.numel():
                raise ValueError(f"a batch of {x.size(0)} rows reached BatchNorm {name} set up for "
                                 f"{self.slots.numel()} rows (adapter names must be given per row of the batch)")
            shape = (x.size(0), x.size(1)) + (1,) * (x.dim() - 2)
            i = self.slots.to(self.mean[name].device)
            # in float32, as BatchNorm itself computes under fp16 autocast
            y = (x.float() - self.mean[name][i].view(shape)) * self.inv_std[name][i].view(shape)
            if m.affine:
                channel = (1, x.size(1)) + (1,) * (x.dim() - 2)
                y = y * m.weight.view(channel).float() + m.bias.view(channel).float()
            return y.to(x.dtype)
        return forward
