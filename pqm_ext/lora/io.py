"""Save and load one adapter in peft's format, tied to the quantised base it was trained on.

A directory holds ``adapter_config.json`` (peft's LoraConfig) and ``adapter_model.safetensors``
(peft's state-dict naming; with ``batchnorm: speaker`` also the speaker's BatchNorm statistics,
pqm_ext.lora.batchnorm) whose metadata records the base fingerprint (a hash of the quantised
checkpoint's tensors) and the toolkit's own settings. Loading into a different base, or an adapter
whose shapes do not fit, is refused with a clear error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pqm_ext.lora.batchnorm import check_statistics, put_statistics, split_statistics, statistics_of
from pqm_ext.lora.config import AdapterConfig
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_dir

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def save_adapter(model: torch.nn.Module, out_dir, cfg: AdapterConfig, name: str = "default",
                 info: Optional[Dict] = None, overwrite: bool = True) -> Path:
    """Write the adapter directory atomically (it appears complete or not at all)."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    if cfg.batchnorm == "speaker":
        state.update(statistics_of(model))
    metadata = {"format": "pt", "pqm_base_fingerprint": getattr(model, "pqm_base_fingerprint", ""),
                "pqm_adapter_config": json.dumps(cfg.to_dict()), "pqm_info": json.dumps(info or {})}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        peft_cfg: LoraConfig = model.peft_config[name]
        (tmp / CONFIG).write_text(json.dumps(peft_cfg.to_dict(), indent=1, default=str))
        save_file(state, str(tmp / WEIGHTS), metadata=metadata)
    return out_dir


def read_adapter(adapter_dir):
    """Return (tensors, metadata) of an adapter directory, with clear errors for bad files."""
    path = Path(adapter_dir) / WEIGHTS
    if not path.is_file():
        raise InputError(path, "adapter weights not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(path, f"unreadable adapter (truncated or corrupt?): {e}") from e
    return tensors, meta


def adapter_info(adapter_dir) -> Dict:
    """The toolkit's record saved with the adapter (speaker, N, epochs, what it was made from, ...)."""
    path = Path(adapter_dir) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise InputError(path, f"unreadable adapter (truncated or corrupt?): {e}") from e
    return json.loads(meta.get("pqm_info", "{}"))


def adapter_config_of(adapter_dir) -> AdapterConfig:
    _, meta = read_adapter(adapter_dir)
    try:
        return AdapterConfig.from_dict(json.loads(meta.get("pqm_adapter_config", "{}")))
    except (TypeError, ValueError) as e:
        raise InputError(Path(adapter_dir) / WEIGHTS, f"adapter config: {e}") from e


def check_scaling(model: torch.nn.Module, name: str, meta: Dict[str, str], path: Path) -> None:
    """Refuse an adapter whose rank or alpha differs from the injected one's: its weights would load (the
    shapes fit when only alpha differs) but be scaled by the model's alpha / rank, not by its own."""
    try:
        saved = json.loads(meta.get("pqm_adapter_config", "{}"))
        if not saved and (path.parent / CONFIG).is_file():  # written by peft itself: its own config
            peft_saved = json.loads((path.parent / CONFIG).read_text())
            saved = {"rank": peft_saved.get("r"), "alpha": peft_saved.get("lora_alpha")}
            saved = {k: v for k, v in saved.items() if v is not None}
    except (ValueError, OSError) as e:
        raise InputError(path, f"unreadable adapter config: {e}") from e
    injected = model.peft_config[name]
    for key, peft_key in (("rank", "r"), ("alpha", "lora_alpha")):
        if key in saved and float(saved[key]) != float(getattr(injected, peft_key)):
            raise InputError(path, f"adapter was trained with LoRA {key} {saved[key]} but is loaded into a LoRA with "
                                   f"{key} {getattr(injected, peft_key)}: its scale (alpha / rank) would change; give "
                                   "the same lora_conf")


def load_adapter_weights(model: torch.nn.Module, adapter_dir, name: str = "default",
                         check_base: bool = True) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """Load the LoRA weights into the already injected adapter ``name``, leaving the model's BatchNorm
    statistics alone; return the adapter's info dict and the statistics saved with it (checked against the
    model; empty unless it was trained with ``batchnorm: speaker``). For callers that keep statistics per
    speaker (``pqm_ext.lora.mixed``); ``load_adapter`` also puts them in."""
    path = Path(adapter_dir) / WEIGHTS
    tensors, meta = read_adapter(adapter_dir)
    tensors, stats = split_statistics(tensors)
    base = getattr(model, "pqm_base_fingerprint", "")
    saved = meta.get("pqm_base_fingerprint", "")
    if check_base and saved != base:
        raise InputError(path, f"adapter was trained on base {saved or '(unknown)'} but this model's base is "
                               f"{base or '(unknown)'}: adapters only fit the quantised base they were trained on")
    check_scaling(model, name, meta, path)
    expected = get_peft_model_state_dict(model, adapter_name=name)
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise InputError(path, f"adapter does not fit the model's LoRA layers: missing {missing[:3]}, extra {extra[:3]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise InputError(path, f"{k}: shape {tuple(v.shape)} does not fit the model's {tuple(expected[k].shape)} "
                                   "(different LoRA rank?)")
    if stats:
        check_statistics(model, stats, path)
    set_peft_model_state_dict(model, tensors, adapter_name=name)
    return json.loads(meta.get("pqm_info", "{}")), stats


def load_adapter(model: torch.nn.Module, adapter_dir, name: str = "default", check_base: bool = True) -> Dict:
    """Load the adapter ``name``, and set the model's BatchNorm statistics to the adapter's (the base's when it
    has none); return the adapter's info dict."""
    info, stats = load_adapter_weights(model, adapter_dir, name, check_base)
    put_statistics(model, stats or None)
    return info


def load_initial_adapter(model: torch.nn.Module, adapter_dir, cfg: AdapterConfig, name: str = "default") -> Dict:
    """Start adapter ``name`` (config ``cfg``) from a trained one, e.g. the multi-speaker pretrained LoRA: its
    weights, and its BatchNorm statistics only if ``cfg`` keeps the speaker's (a ``frozen`` adapter is
    decoded with the base's statistics, so it must also train with them)."""
    if cfg.batchnorm == "speaker":
        return load_adapter(model, adapter_dir, name)
    return load_adapter_weights(model, adapter_dir, name)[0]
