"""Quantised checkpoints: one safetensors file holding 4-bit weights and their state as they are.

Reloading rebuilds the quantised structure (no full-precision weights, no re-quantisation) and
loads the tensors strictly: the round trip is bit-exact. The metadata records the quantisation
config, a fingerprint of the architecture (module names, types and logical shapes) and a SHA-256
of every tensor; a checkpoint for another architecture, or a corrupted one, is refused. Modules that act
only in training and hold no weights (SpecAugment) are not part of the architecture: an adapter may be
trained with them switched off (``--specaug none``) on a base that was trained with them. The metadata
names what the fingerprint left out (``architecture_excludes``); older checkpoints, which do not, are
matched with everything hashed (before 0d7be49) and without SpecAugment (0d7be49).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pqm_ext.quant.config import QuantConfig
from pqm_ext.quant.nf4 import NF4Linear, NF4Store
from pqm_ext.quant.quantize import quantize_model, unquantized_float_tensors
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_file

FORMAT = "pqm-quantized-v1"
TRAINING_ONLY = frozenset({"specaug"})  # ESPnet's attribute for SpecAug: weightless, identity in eval mode


def architecture_fingerprint(model: torch.nn.Module, exclude: FrozenSet[str] = TRAINING_ONLY) -> str:
    """Hash of module names, types and logical weight shapes (independent of the weights), leaving out the
    modules named in ``exclude`` (checkpoints record which; those written before 0d7be49 left out none)."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        if exclude.intersection(name.split(".")):
            continue
        if isinstance(m, NF4Linear):
            shapes = [("weight", (m.out_features, m.in_features))]
        elif isinstance(m, NF4Store):
            shapes = [("weight", tuple(m.shape))]
        else:
            shapes = [(n, tuple(t.shape)) for n, t in m.named_parameters(recurse=False)]
            shapes += [(n, tuple(t.shape)) for n, t in m.named_buffers(recurse=False)
                       if n not in m._non_persistent_buffers_set]
        if "lora_" in name:
            continue
        h.update(f"{name}|{type(m).__name__}|{shapes}\n".encode())
    return h.hexdigest()[:16]


def tensors_fingerprint(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
        h.update(k.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def base_state(model: torch.nn.Module, cfg: QuantConfig) -> Dict[str, torch.Tensor]:
    """State dict without LoRA, unquantised floats cast to the storage dtype (lossless: they were rounded)."""
    storage = getattr(torch, cfg.storage_dtype)
    unq = {k.replace(".base_layer.", ".") for k in unquantized_float_tensors(model)}  # named as below
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")  # peft-wrapped layers keep their base names
        v = v.detach().to(storage) if k in unq else v.detach()
        out[k] = v.clone().contiguous().cpu()
    return out


def save_quantized(model: torch.nn.Module, path, cfg: QuantConfig, extra: Optional[Dict[str, str]] = None) -> str:
    """Write ``path`` atomically; return the base fingerprint (adapters record it)."""
    tensors = base_state(model, cfg)
    fingerprint = tensors_fingerprint(tensors)
    metadata = {"format": FORMAT, "quant_config": json.dumps(cfg.to_dict()), "fingerprint": fingerprint,
                "architecture": architecture_fingerprint(model),
                "architecture_excludes": ",".join(sorted(TRAINING_ONLY))}
    clash = set(extra or {}) & set(metadata)
    if clash:
        raise ValueError(f"extra metadata may not replace {sorted(clash)}")
    metadata.update(extra or {})
    with atomic_file(path, "wb") as f:
        f.close()
        save_file(tensors, f.name, metadata=metadata)
    return fingerprint


def read_metadata(path) -> Dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "quantised checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(path, f"not a readable safetensors checkpoint (truncated or corrupt?): {e}") from e
    if meta.get("format") != FORMAT:
        raise InputError(path, f"not a PQM quantised checkpoint (format={meta.get('format')!r})")
    return meta


def _tensors_fit(path: Path, model: torch.nn.Module) -> bool:
    """Whether the file holds the names and shapes of ``model``'s saved tensors (quantisation states aside:
    ``<weight>.<stat>`` keys), before any is loaded."""
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError):
        return False
    stored = {k: v for k, v in stored.items()
              if not any(".".join(k.split(".")[:i]) in stored for i in range(1, k.count(".") + 1))}
    expected = {n: tuple(t.shape) for n, t in model.named_parameters(remove_duplicate=False)}
    for prefix, m in model.named_modules():
        expected.update({f"{prefix}.{n}" if prefix else n: tuple(t.shape) for n, t in m.named_buffers(recurse=False)
                         if n not in m._non_persistent_buffers_set})
    return stored == expected


def load_quantized(model: torch.nn.Module, path) -> Tuple[QuantConfig, str]:
    """Quantise ``model``'s structure as the checkpoint says and load it; return (config, fingerprint).

    ``model`` is a freshly built full-precision architecture without adapters (its random weights
    are discarded); inject LoRA afterwards.
    """
    path = Path(path)
    meta = read_metadata(path)
    cfg = QuantConfig.from_dict(json.loads(meta["quant_config"]))
    quantize_model(model, cfg, materialize=False)
    excluded = frozenset(meta.get("architecture_excludes", "").split(",")) - {""}
    arch = architecture_fingerprint(model, exclude=excluded)
    accepted = {arch}
    unrecorded = "architecture_excludes" not in meta
    if unrecorded:  # everything was hashed (before 0d7be49; ``arch``), or TRAINING_ONLY was left out (0d7be49 only)
        accepted.add(architecture_fingerprint(model))
    if meta["architecture"] not in accepted:
        hint = ""
        if unrecorded and _tensors_fit(path, model):
            hint = ("; its tensors fit, so only weightless modules differ: a checkpoint written before 0d7be49 (no "
                    "architecture_excludes in its metadata) also hashed SpecAugment and loads only with the same "
                    "SpecAugment, and stage 7 now adapts without it: remove its directory and quantise again "
                    "(stage 5)")
        raise InputError(path, f"checkpoint is for another architecture (fingerprint {meta['architecture']}, "
                               f"this model {arch}): check the model config{hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(path, f"cannot read tensors (truncated or corrupt?): {e}") from e
    if tensors_fingerprint(tensors) != meta["fingerprint"]:
        raise InputError(path, "tensor checksum mismatch: the file is corrupted")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise InputError(path, f"checkpoint does not fit the model: {e}") from e
    model.pqm_base_fingerprint = meta["fingerprint"]
    return cfg, meta["fingerprint"]
