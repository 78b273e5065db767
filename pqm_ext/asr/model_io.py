"""Full-precision and quantised model files, and loading a base into a freshly built model.

A model directory holds ESPnet's ``config.yaml`` (what ``ASRTask.build_model`` needs),
``model.safetensors`` and, for a BPE model, its ``bpe.model``. Full-precision files carry
``format=pqm-fp-v1``; quantised ones are written by ``pqm_ext.quant.save_quantized``. Both load with
safetensors (no pickle).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pqm_ext.quant import QuantConfig, load_quantized, quantize_model
from pqm_ext.quant.checkpoint import FORMAT as QUANT_FORMAT, base_state, tensors_fingerprint
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_file

logger = logging.getLogger(__name__)
FP_FORMAT = "pqm-fp-v1"
MODEL_FILE = "model.safetensors"
BPE_MODEL = "bpe.model"


def bundled_bpemodel(model_dir) -> Optional[str]:
    """The sentencepiece model a model directory carries (stage 4 puts it there, stage 5 copies it along).

    ESPnet's config.yaml names it by a path relative to the recipe that trained the model, which breaks
    from any other directory; the copy next to the model does not.
    """
    path = Path(model_dir) / BPE_MODEL
    return str(path) if path.is_file() else None


def save_fp_model(model: torch.nn.Module, path, extra: Optional[Dict[str, str]] = None) -> None:
    tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    with atomic_file(path, "wb") as f:
        f.close()
        save_file(tensors, f.name, metadata={"format": FP_FORMAT, **(extra or {})})


def file_format(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format", "")
    except (SafetensorError, OSError) as e:
        raise InputError(path, f"not a readable safetensors model (truncated or corrupt?): {e}") from e


def load_base(model: torch.nn.Module, path, quant: QuantConfig) -> str:
    """Load the frozen base into ``model`` (no adapters yet), quantising it if asked.

    A quantised checkpoint is loaded as stored (its own config must agree with ``quant`` when
    ``quant`` asks for quantisation); a full-precision one is loaded, then quantised with ``quant``.
    Returns the base fingerprint that adapters record.
    """
    path = Path(path)
    fmt = file_format(path)
    if fmt == QUANT_FORMAT:
        stored, fingerprint = load_quantized(model, path)
        if quant.enabled and stored.to_dict() != quant.to_dict():
            raise InputError(path, f"checkpoint is quantised as {stored.to_dict()}, but the config asks for "
                                   f"{quant.to_dict()}")
        return fingerprint
    if fmt != FP_FORMAT:
        raise InputError(path, f"unknown model file format {fmt!r}")
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise InputError(path, f"model file does not fit the model config: {e}") from e
    quantize_model(model, quant)
    model.pqm_base_fingerprint = tensors_fingerprint(base_state(model, quant))
    return model.pqm_base_fingerprint
